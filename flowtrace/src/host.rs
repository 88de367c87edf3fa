//! The node's own state flowtrace follows: its network links over netlink (`links`: which
//! interfaces exist, what they are, which to trace) and conntrack's translated connections
//! (`conntrack`: dumps and NEW/DESTROY events).

pub mod conntrack;
pub mod links;
pub mod netns;
