//! The agent's errors are those of the host boundary ([`wrenn_host::HostError`]): whatever
//! fails here reaches the control plane as it is, and is mapped to an API error there.

pub(crate) use wrenn_host::HostError;

pub(crate) type Result<T> = std::result::Result<T, HostError>;
