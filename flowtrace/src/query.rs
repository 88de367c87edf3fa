//! Questions asked of enriched flows: filters (`filter`) and the path of a connection across
//! nodes with NAT steps and latency (`path`, joined from the agents' API answers).

pub mod filter;
pub mod path;
