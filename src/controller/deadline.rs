//! How long anything may take on the network. Every request to a member or to the hub has a
//! deadline, so that a server that accepts connections and never answers (frozen, black-holed,
//! a pooled connection silently dropped) costs a bounded wait and is then found out
//! (docs/decisions.md, "Deadlines").

use std::time::Duration;

/// Establishing a TCP connection.
pub const CONNECT: Duration = Duration::from_secs(5);
/// The longest a connection may stay silent while a response is awaited, between any two reads
/// (a slow but streaming list of 20,000 objects is fine). Longer than `WATCH_SECONDS`, so an idle
/// watch is ended by its server, cleanly, before this fires.
pub const READ: Duration = Duration::from_secs(30);
/// Sending a request.
pub const WRITE: Duration = Duration::from_secs(10);
/// How long the API server keeps a watch open before ending it (the watch then resumes from
/// its last resourceVersion, without a relist).
pub const WATCH_SECONDS: u32 = 20;
/// One whole write (an apply with its fallbacks, a delete, a status, a VIP store update), a
/// lease round, a TokenReview or SubjectAccessReview.
pub const REQUEST: Duration = Duration::from_secs(10);
/// How often a member is asked whether it answers, and how long it has to answer.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
pub const PROBE: Duration = Duration::from_secs(5);

/// Sets the connection deadlines on a client configuration (members and the hub alike).
pub fn apply(config: &mut kube::Config) {
    config.connect_timeout = Some(CONNECT);
    config.read_timeout = Some(READ);
    config.write_timeout = Some(WRITE);
    // Count the read deadline from when a request is sent, not from when its pooled connection
    // last carried anything.
    config.reset_reader_on_write = true;
}

/// A watcher configuration whose watches the server ends before `READ` runs out.
pub fn watcher_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default().timeout(WATCH_SECONDS)
}
