//! The node's own state flowtrace follows: its network links over netlink (`links`: which
//! interfaces exist, which to trace; `roles`: what each is, from its addresses and routes) and conntrack's translated connections
//! (`conntrack`: dumps and NEW/DESTROY events).

pub mod conntrack;
pub mod links;
pub mod netns;
pub mod roles;
