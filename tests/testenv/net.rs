//! Addresses for test processes that cannot collide.
//!
//! Every server the harness starts (a member's etcd and kube-apiserver, a flotilla replica, an
//! istiod) gets a loopback address of its own in 127.1.0.0/16 and listens on fixed, well-known
//! ports there. An address is taken by holding an exclusive `flock` on a file named after it, so
//! two harnesses (test threads, test binaries, benches running at once) never take the same
//! one, and the kernel releases it when the holder dies, however it dies. Nothing is ever picked
//! by asking the kernel for a free port and letting go of it, which is what let another process
//! take a port between the test finding it and the server binding it.
//!
//! Other programs on the machine bind 127.0.0.1 or wildcard addresses: the fixed ports are all
//! below the kernel's ephemeral range, so a client's outgoing connection never holds one, and a
//! candidate address whose ports something else already holds is skipped (checked by binding).

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Ports servers listen on, each on its own address.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
pub const APISERVER_PORT: u16 = 6443;
pub const HTTP_PORT: u16 = 8080;
pub const SECURE_PORT: u16 = 8443;

/// The addresses handed out: 127.1.0.1 … 127.1.255.254 (65,024 of them).
const FIRST: u32 = u32::from_be_bytes([127, 1, 0, 0]);
const COUNT: u32 = 1 << 16;

/// A loopback address held for the life of this value (and of the process holding it).
#[derive(Debug)]
pub struct Host {
    pub ip: Ipv4Addr,
    /// The open, locked file is the claim; closing it (drop, or the process dying) releases it.
    _claim: File,
}

impl Host {
    /// Claims a free address on which every port in `ports` can be bound now.
    pub fn claim(ports: &[u16]) -> Host {
        let dir = claims_dir();
        // Start where this process's id points, so that processes rarely contend for the same
        // locks; the scan then walks the whole range.
        let start = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
        let mut skipped = Vec::new();
        for step in 0..COUNT {
            let ip = Ipv4Addr::from(FIRST + (start + step) % COUNT);
            let last = ip.octets()[3];
            if last == 0 || last == 255 {
                continue;
            }
            let path = dir.join(ip.to_string());
            let file = File::options().create(true).truncate(false).write(true).open(&path);
            let file = file.unwrap_or_else(|e| panic!("opening the address claim {}: {e}", path.display()));
            // SAFETY: flock on a file descriptor this function owns; no memory is shared.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            if !locked {
                continue; // another harness holds it
            }
            match ports.iter().find(|p| TcpListener::bind(SocketAddr::from((ip, **p))).is_err()) {
                None => return Host { ip, _claim: file },
                // Something outside the harness listens there (or a wildcard listener holds the
                // port everywhere): try another address, and say so if none works.
                Some(port) => {
                    skipped.push(format!("{ip}:{port}"));
                    if skipped.len() >= 32 {
                        panic!(
                            "no loopback address in 127.1.0.0/16 has the ports {ports:?} free; taken: {}",
                            skipped.join(", ")
                        );
                    }
                }
            }
        }
        panic!("every loopback address in 127.1.0.0/16 is claimed by another test harness");
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

pub fn claims_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("flotilla-testenv").join("addresses");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}
