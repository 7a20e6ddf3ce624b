//! Publish and subscribe: the topic registry (`hub`, pure), the Redis link that shares
//! topics and ids between processes (`redis`; `cluster`: Redis Cluster's slots), who is subscribed where (`presence`,
//! pure), and the pipeline that joins them to the
//! connection table (`pipeline`).

pub mod cluster;
pub mod history;
pub mod hub;
pub mod occupancy;
pub mod pipeline;
pub mod presence;
pub mod redis;

pub use pipeline::{Fanout, PubSub};
