//! The parts of `branchsync-server` that other crates use too: the HTTP
//! status server and client ([`http`]) and the scenario runner
//! ([`scenario`], whose local target's [`scenario::local::LinkProxy`] the
//! end-to-end tests cut links with). The daemon itself (config, link, node)
//! lives in the `branchsync` binary, which builds on this library.

pub mod http;
pub mod scenario;
pub mod tls;
