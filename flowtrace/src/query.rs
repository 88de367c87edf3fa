//! Questions asked of enriched flows: filters (`filter`) and the path of a connection across
//! nodes with NAT steps and latency (`path`, joined from the agents' API answers), and the
//! application's map those paths make (`map`).

pub mod filter;
pub mod map;
pub mod path;
