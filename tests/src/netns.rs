//! A LAN of network namespaces that a test creates and removes: a bridge in a namespace of
//! its own and one namespace per host, each joined to it by a veth pair. Multicast (mDNS)
//! stays inside them; nothing reaches the machine's own network. Needs `ip` (iproute2) and
//! root; the nodes run in the namespaces through `ip netns exec`.

use std::process::Command;

/// The subnet the hosts get addresses in: 10.77.0.2, 10.77.0.3, ...
const SUBNET: &str = "10.77.0";

/// The namespaces of one test's LAN; removed (with their links) when dropped.
pub struct Lan {
    prefix: String,
    hosts: Vec<String>,
}

/// Run `ip` with `args`; panics with its output when it fails.
pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {} (network namespaces need root: run the test as root)",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    /// A LAN with one namespace per name in `hosts`, each with its loopback up and an address
    /// on the bridge.
    pub fn new(hosts: &[&str]) -> Lan {
        let prefix = format!("ts{}", std::process::id() % 100_000);
        let lan = Lan {
            prefix,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        // Leftovers of an earlier run with the same process id go first.
        lan.remove();
        let bridge_ns = lan.bridge_ns();
        ip(&["netns", "add", &bridge_ns]);
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        for (i, host) in lan.hosts.iter().enumerate() {
            let ns = lan.ns(host);
            let veth = format!("{}v{i}", lan.prefix);
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "netns", &bridge_ns]);
            ip(&["-n", &bridge_ns, "link", "set", &veth, "master", "br0"]);
            ip(&["-n", &bridge_ns, "link", "set", &veth, "up"]);
            let addr = format!("{SUBNET}.{}/24", i + 2);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lan
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-lan", self.prefix)
    }

    fn remove(&self) {
        for ns in self
            .hosts
            .iter()
            .map(|h| self.ns(h))
            .chain([self.bridge_ns()])
        {
            // Absent namespaces are fine here.
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove();
    }
}
