//! Kubernetes metadata: who an IP address is (pod, Service, node), kept small.
//!
//! The sources (`source`: API watches or a metadata file) turn API objects into the compact
//! records of `objects` and apply them to the cache (`cache::MetaCache`), which answers the
//! drain's and the API's questions: "who is 10.244.1.7?", "which Service is
//! 10.96.0.10:80/tcp?". The names it answers with are the model's (`model::Endpoint`).

pub mod cache;
pub mod kind;
pub mod objects;
pub mod source;
#[cfg(test)]
mod tests;

pub use cache::{MetaCache, ObjKey};
pub use kind::Kind;
pub use objects::{
    EndpointSliceRecord, NodeRecord, OwnerRecord, PodRecord, ServicePortRecord, ServiceRecord,
};
