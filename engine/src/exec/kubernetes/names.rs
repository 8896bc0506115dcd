//! Names and labels of what the Kubernetes runner makes: Job names of at most 63 characters,
//! label values, the run's Secret, and the address pods reach the driver at.

/// The key of the run's Secret that remembers its endpoint's port and token.
pub(super) const ENDPOINT_KEY: &str = "endpoint";

/// The run's Secret of credentials.
pub(super) fn secret_name(run: &str) -> String {
    truncate_name(&format!("ccluster-{}-credentials", dns_label(run)))
}

/// The address of this machine the API server is reached from: the one pods most likely reach
/// it at too. Refused when that is loopback (a cluster on this machine's loopback reaches it
/// elsewhere).
pub(super) fn default_advertise(server: &str) -> Result<String, String> {
    let authority = crate::exec::egress::Allow::host_of_url(server)
        .ok_or_else(|| format!("cannot read the API server's address from `{server}`"))?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority
    } else {
        format!("{authority}:443")
    };
    use std::net::ToSocketAddrs;
    let target = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the API server `{with_port}`: {e}"))?
        .next()
        .ok_or_else(|| format!("the API server `{with_port}` has no address"))?;
    // Connecting a UDP socket sends nothing: it only picks the route, and so the local address.
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|e| format!("cannot find a local address: {e}"))?;
    socket
        .connect(target)
        .map_err(|e| format!("cannot find a route to the API server {target}: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot find a local address: {e}"))?
        .ip();
    if local.is_loopback() {
        return Err(format!(
            "the API server is reached on this machine's loopback ({target}), where pods cannot reach ccluster's git endpoint: give `--advertise-addr` an address of this machine that the cluster's pods reach"
        ));
    }
    Ok(local.to_string())
}

/// `text` as a label value: itself when Kubernetes allows it, else a hash of it.
pub(super) fn label_value(text: &str) -> String {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        text.to_string()
    } else {
        label_hash(text)
    }
}

/// A short hash of `text`, fit for a label value.
pub(super) fn label_hash(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
}

pub(super) fn random_salt() -> [u8; 32] {
    let mut salt = [0u8; 32];
    for b in salt.iter_mut() {
        *b = fastrand::u8(..);
    }
    salt
}

/// `text` in the alphabet of a DNS label: lowercase letters, digits and `-`.
pub(super) fn dns_label(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_string()
}

/// At most 63 characters, ending in a letter or digit.
pub(super) fn truncate_name(name: &str) -> String {
    let mut n: String = name.chars().take(63).collect();
    while n.ends_with('-') {
        n.pop();
    }
    n
}

/// The Job of an attempt: the same name for the same run, node and attempt (a leftover one is
/// found by it), at most 63 characters, unique through a hash of the node's full name.
pub fn job_name(run: &str, node: &str, attempt: &str) -> String {
    let hash = &blake3::hash(format!("{run}\0{node}").as_bytes()).to_hex()[..8];
    let run = dns_label(run);
    let attempt = dns_label(attempt);
    let fixed = 3 + run.len() + 1 + 8 + 1 + attempt.len();
    let room = 63usize.saturating_sub(fixed + 1);
    let slug: String = dns_label(node).chars().take(room).collect();
    let slug = slug.trim_matches('-');
    let name = if slug.is_empty() {
        format!("cc-{run}-{hash}-{attempt}")
    } else {
        format!("cc-{run}-{slug}-{hash}-{attempt}")
    };
    truncate_name(&name)
}

pub(super) fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    #[test]
    fn job_names_are_dns_labels_the_same_for_the_same_attempt_and_apart_otherwise() {
        let run = "20261204-163201.160-c357";
        let long = "a-task-with-a-very-long-name-that-goes-on[and-on-and-on-and-on-forever]";
        for node in ["build", "build[0]", "build[1]", "Build_X", "é", "-", long] {
            let name = job_name(run, node, "1");
            assert!(is_dns_label(&name), "{node}: {name}");
            assert_eq!(name, job_name(run, node, "1"));
            assert_ne!(name, job_name(run, node, "2"));
        }
        // Names that read the same once cleaned still differ.
        assert_ne!(job_name(run, "a[1]", "1"), job_name(run, "a-1", "1"));
        assert_ne!(
            job_name(run, &format!("{long}x"), "1"),
            job_name(run, &format!("{long}y"), "1")
        );
        assert!(is_dns_label(&secret_name(run)));
    }

    #[test]
    fn label_values_are_kept_when_kubernetes_takes_them_else_hashed() {
        assert_eq!(
            label_value("20261204-163201.160-c357"),
            "20261204-163201.160-c357"
        );
        assert_eq!(label_value("k8s"), "k8s");
        for bad in ["_x", "x_", "a b", "", &"x".repeat(64), "a/b"] {
            let v = label_value(bad);
            assert_eq!(v.len(), 32, "{bad}");
            assert!(v.chars().all(|c| c.is_ascii_hexdigit()), "{bad}");
        }
    }
}
