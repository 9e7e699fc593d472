//! kiln: machine images built the way Packer builds them, as a Kubernetes resource.

pub mod api;
pub mod builders;
pub mod communicator;
pub mod controller;
pub mod engine;
pub mod leader;
pub mod metrics;
pub mod pipeline;
pub mod provisioners;
pub mod refs;
pub mod serve;
pub mod sync;
