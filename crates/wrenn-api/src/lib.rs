//! Wire types of the Wrenn public API.
//!
//! Every type here mirrors a schema of `docs/openapi.yaml`; field names and optionality follow the
//! spec exactly so that the official SDK and any generated client deserialize our answers.

pub mod account;
pub mod audit;
pub mod build;
pub mod capsule;
pub mod channel;
pub mod error;
pub mod event;
pub mod host;
pub mod id;
pub mod metrics;
pub mod network;
pub mod proxy;
pub mod quota;
pub mod stats;
pub mod template;

pub use account::*;
pub use audit::*;
pub use build::*;
pub use capsule::*;
pub use channel::*;
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use event::*;
pub use host::*;
pub use metrics::{MetricPoint, MetricsRange};
pub use network::{NetworkPolicy, MAX_EGRESS_RULES};
pub use proxy::*;
pub use stats::*;
pub use template::*;
