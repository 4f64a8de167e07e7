//! Generates the control plane ↔ agent gRPC service (client and server) from the description
//! below. It has four methods whatever the number of host operations: `Call` carries any
//! operation of the `Host` trait as JSON (`src/operations.rs` defines them), `Tunnel` the raw
//! bytes of one envd connection. `ReadFile` and `WriteFile` move a snapshot's files between
//! hosts (arguments as JSON in the `x-args` metadata, the file's bytes as raw messages).

fn main() {
    let service = tonic_build::manual::Service::builder()
        .name("Agent")
        .package("wrenn.host")
        .method(
            tonic_build::manual::Method::builder()
                .name("call")
                .route_name("Call")
                .input_type("crate::operations::Call")
                .output_type("serde_json::Value")
                .codec_path("crate::rpc::codec::JsonCodec")
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("tunnel")
                .route_name("Tunnel")
                .input_type("bytes::Bytes")
                .output_type("bytes::Bytes")
                .codec_path("crate::rpc::codec::RawCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("read_file")
                .route_name("ReadFile")
                .input_type("bytes::Bytes")
                .output_type("bytes::Bytes")
                .codec_path("crate::rpc::codec::RawCodec")
                .server_streaming()
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("write_file")
                .route_name("WriteFile")
                .input_type("bytes::Bytes")
                .output_type("bytes::Bytes")
                .codec_path("crate::rpc::codec::RawCodec")
                .client_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
