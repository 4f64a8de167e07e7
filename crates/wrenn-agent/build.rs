//! Generates the control plane ↔ agent gRPC service (client and server) from the description
//! below: messages are the serde types of `src/rpc/wire.rs` in JSON, except the envd tunnel,
//! whose messages are raw bytes.

fn main() {
    let unary = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(input)
            .output_type(output)
            .codec_path("crate::rpc::codec::JsonCodec")
            .build()
    };
    let w = |t: &str| format!("crate::rpc::wire::{t}");
    let service = tonic_build::manual::Service::builder()
        .name("Agent")
        .package("wrenn.agent")
        .method(unary("templates", "Templates", &w("Empty"), &w("Names")))
        .method(unary("reap_dead", "ReapDead", &w("Empty"), &w("DeadList")))
        .method(unary("capacity", "Capacity", &w("Empty"), &w("Capacity")))
        .method(unary(
            "base_templates",
            "BaseTemplates",
            &w("Empty"),
            &w("BaseTemplateList"),
        ))
        .method(unary("create", "Create", &w("CreateRequest"), &w("Info")))
        .method(unary(
            "snapshot",
            "Snapshot",
            &w("SnapshotRequest"),
            &w("SnapshotMeta"),
        ))
        .method(unary(
            "metrics",
            "Metrics",
            &w("MetricsRequest"),
            &w("MetricList"),
        ))
        .method(unary(
            "delete_snapshot",
            "DeleteSnapshot",
            &w("Id"),
            &w("Empty"),
        ))
        .method(unary("destroy", "Destroy", &w("Id"), &w("Flag")))
        .method(unary("pause", "Pause", &w("Id"), &w("Empty")))
        .method(unary("resume", "Resume", &w("Id"), &w("Info")))
        .method(unary("list", "List", &w("Empty"), &w("InfoList")))
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
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
