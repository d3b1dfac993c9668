//! Vault's audit stream as a trigger: the entries a `socket` audit device sends, read and
//! classified.
//!
//! Vault and OpenBao send every audited request and response to a `socket` audit device as one
//! JSON object per line — over UDP, one line per datagram. Only a *successful response* to a
//! write of a KV v2 path is of interest here ([`parse`]): `data/` create, update, patch and
//! delete; `delete/`, `undelete/` and `destroy/`; `metadata/` writes and deletes. Everything
//! else — requests, reads, failures, other engines — is ignored.
//!
//! An entry is a hint, never a source of values: the operator reads the path again from Vault
//! with its own authenticated client. So nothing of an entry is kept beyond the path and the
//! operation (the deserializer does not even keep the request's data, which Vault HMACs but a
//! `log_raw` device would send in clear), a forged entry can at worst cause extra reads, and
//! a lost one is caught by the periodic refresh.
//!
//! The facts the parser relies on were checked against OpenBao 2.7.2 (`bao kv put`, `patch`,
//! `delete`, `undelete`, `destroy`, `metadata put|patch|delete`, in the root namespace and in
//! a child one); samples with their values replaced are in `tests/fixtures/audit/`:
//! - each entry has `"type": "request"` or `"type": "response"`; a failed request's response
//!   carries a non-empty `"error"`;
//! - `request.path` is relative to the request's namespace (`secret/data/shop`,
//!   `kv/data/shop/envs/dev` in namespace `team1/`); `request.mount_point` is the mount
//!   *with* the namespace (`team1/kv/`); `request.namespace.path` is the namespace
//!   (`team1/`, absent in the root);
//! - `request.mount_type` is `kv`; `request.operation` is `create`, `update`, `patch`,
//!   `delete`, `read` or `list`;
//! - over UDP each entry is one datagram ending in `\n`, 1–2.5 KiB for a KV write.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};

use crate::pipeline::index::{Location, VaultPath};

/// Longest entry read. A UDP datagram cannot be longer; a longer TCP line is dropped whole.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// TCP connections served at once (Vault keeps one per audit device).
const MAX_TCP_CONNECTIONS: usize = 16;

/// What a successful KV v2 write did to its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `data/`: a new version (create or update).
    Write,
    /// `data/`: a new version from a JSON merge patch.
    Patch,
    /// `data/` delete or `delete/`: versions soft-deleted.
    Delete,
    /// `undelete/`: versions restored.
    Undelete,
    /// `destroy/`: versions destroyed.
    Destroy,
    /// `metadata/` create, update or patch (custom metadata holds owners and expiries).
    MetadataWrite,
    /// `metadata/` delete: every version gone.
    MetadataDelete,
}

impl Operation {
    /// The operation's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Write => "write",
            Operation::Patch => "patch",
            Operation::Delete => "delete",
            Operation::Undelete => "undelete",
            Operation::Destroy => "destroy",
            Operation::MetadataWrite => "metadata-write",
            Operation::MetadataDelete => "metadata-delete",
        }
    }
}

/// A successful write of one KV v2 path, as the audit stream reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvWrite {
    pub path: VaultPath,
    pub operation: Operation,
}

/// Why an entry could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("failed to read an audit entry: not a JSON audit entry (garbage or truncated)")]
    Malformed,
    #[error("failed to read an audit entry: longer than {MAX_ENTRY_BYTES} bytes")]
    Oversized,
}

impl EntryError {
    /// Fixed category, the metric's outcome label.
    pub fn category(self) -> &'static str {
        match self {
            EntryError::Malformed => "malformed",
            EntryError::Oversized => "oversized",
        }
    }
}

/// The fields of an entry the operator looks at; everything else (request and response data,
/// tokens, addresses) is skipped by the deserializer and never held.
#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    error: Option<String>,
    request: Option<RawRequest>,
}

#[derive(Deserialize)]
struct RawRequest {
    operation: String,
    path: String,
    #[serde(default)]
    mount_point: Option<String>,
    #[serde(default)]
    mount_type: Option<String>,
    #[serde(default)]
    namespace: Option<RawNamespace>,
}

#[derive(Deserialize)]
struct RawNamespace {
    #[serde(default)]
    path: Option<String>,
}

/// Reads one entry: `Some` for a successful KV v2 write, `None` for anything else.
pub fn parse(bytes: &[u8]) -> Result<Option<KvWrite>, EntryError> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(EntryError::Oversized);
    }
    let entry: RawEntry = serde_json::from_slice(bytes).map_err(|_| EntryError::Malformed)?;
    if entry.kind != "response" || entry.error.is_some_and(|e| !e.is_empty()) {
        return Ok(None);
    }
    let Some(request) = entry.request else {
        return Err(EntryError::Malformed);
    };
    if request.mount_type.as_deref() != Some("kv") {
        return Ok(None);
    }
    let namespace = request
        .namespace
        .and_then(|n| n.path)
        .map(|p| p.trim_matches('/').to_string())
        .filter(|p| !p.is_empty());
    // `mount_point` names the namespace too; `path` is relative to it.
    let Some(mount_point) = request.mount_point else {
        return Ok(None);
    };
    let mount = match &namespace {
        Some(ns) => mount_point
            .trim_start_matches('/')
            .strip_prefix(ns.as_str())
            .unwrap_or(&mount_point)
            .trim_matches('/')
            .to_string(),
        None => mount_point.trim_matches('/').to_string(),
    };
    let Some(rest) = request
        .path
        .trim_start_matches('/')
        .strip_prefix(mount.as_str())
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Ok(None);
    };
    let Some((kind, path)) = rest.split_once('/') else {
        return Ok(None);
    };
    let path = path.trim_matches('/');
    if path.is_empty() {
        return Ok(None);
    }
    let op = request.operation.as_str();
    let operation = match (kind, op) {
        ("data", "create" | "update") => Operation::Write,
        ("data", "patch") => Operation::Patch,
        ("data", "delete") | ("delete", "create" | "update") => Operation::Delete,
        ("undelete", "create" | "update") => Operation::Undelete,
        ("destroy", "create" | "update") => Operation::Destroy,
        ("metadata", "create" | "update" | "patch") => Operation::MetadataWrite,
        ("metadata", "delete") => Operation::MetadataDelete,
        _ => return Ok(None),
    };
    Ok(Some(KvWrite {
        path: VaultPath::new(Location::new(namespace.as_deref(), &mount), path),
        operation,
    }))
}

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A v4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || format!("{s:?} is not an IP address or network (e.g. 10.0.0.0/8, 10.1.2.3)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

/// Where entries are received.
#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// UDP address (and TCP, with `tcp`).
    pub addr: SocketAddr,
    /// Also accept a `tcp` socket device on the same address.
    pub tcp: bool,
    /// Sources accepted; empty: any.
    pub allow_from: Vec<Cidr>,
}

impl ListenConfig {
    fn allows(&self, ip: IpAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|c| c.contains(ip))
    }
}

/// One thing the listener received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// From a source outside `--audit-allow-from`: dropped unread.
    Refused,
    /// An entry, read: a KV v2 write, or `None` for anything else.
    Entry(Result<Option<KvWrite>, EntryError>),
}

/// Receives what the listener reads, with the instant it arrived.
pub type Handler = Arc<dyn Fn(Received, Instant) + Send + Sync>;

/// The bound sockets.
pub struct Listener {
    config: ListenConfig,
    udp: UdpSocket,
    tcp: Option<TcpListener>,
}

impl Listener {
    /// Binds the sockets (so that a taken port fails the start, not later).
    pub async fn bind(config: ListenConfig) -> std::io::Result<Listener> {
        let udp = UdpSocket::bind(config.addr).await?;
        // Port 0 binds both protocols on the port UDP got.
        let addr = udp.local_addr()?;
        let tcp = if config.tcp {
            Some(TcpListener::bind(addr).await?)
        } else {
            None
        };
        Ok(Listener { config, udp, tcp })
    }

    /// The UDP (and TCP) address bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Reads entries until the task is dropped. Nothing received is fatal.
    pub async fn run(self, handler: Handler) {
        let Listener { config, udp, tcp } = self;
        let config = Arc::new(config);
        let tcp_task = tcp.map(|tcp| {
            let (config, handler) = (config.clone(), handler.clone());
            AbortOnDrop(tokio::spawn(serve_tcp(tcp, config, handler)))
        });
        serve_udp(udp, &config, &handler).await;
        drop(tcp_task);
    }
}

async fn serve_udp(udp: UdpSocket, config: &ListenConfig, handler: &Handler) {
    // One byte more than any entry read, so that a longer one is seen as such.
    let mut buf = vec![0u8; MAX_ENTRY_BYTES + 1];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(got) => got,
            // ICMP errors surface here on some systems; the socket stays usable.
            Err(e) => {
                tracing::debug!("audit listener: failed to receive a datagram: {e}");
                continue;
            }
        };
        let at = Instant::now();
        if !config.allows(peer.ip()) {
            handler(Received::Refused, at);
            continue;
        }
        handler(Received::Entry(parse(trim_newline(&buf[..n]))), at);
    }
}

async fn serve_tcp(tcp: TcpListener, config: Arc<ListenConfig>, handler: Handler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = tcp.accept().await else {
            continue;
        };
        let at = Instant::now();
        if !config.allows(peer.ip()) {
            handler(Received::Refused, at);
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("audit listener: too many TCP connections; one refused");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            read_lines(stream, &handler).await;
            drop(slot);
        });
    }
}

/// Reads `\n`-separated entries from one connection; a line longer than [`MAX_ENTRY_BYTES`]
/// is dropped whole (counted once), without holding more than that in memory.
async fn read_lines(stream: impl tokio::io::AsyncRead + Unpin, handler: &Handler) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut oversized = false;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => return,
            Ok(chunk) => chunk,
        };
        let (part, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !oversized {
            if line.len() + part.len() > MAX_ENTRY_BYTES {
                oversized = true;
                line.clear();
            } else {
                line.extend_from_slice(part);
            }
        }
        let used = end.unwrap_or(chunk.len());
        reader.consume(used);
        if end.is_some() {
            let at = Instant::now();
            let entry = if oversized {
                Err(EntryError::Oversized)
            } else {
                parse(trim_newline(&line))
            };
            // Blank lines between entries are not entries.
            if !line.is_empty() || oversized {
                handler(Received::Entry(entry), at);
            }
            line.clear();
            oversized = false;
        }
    }
}

fn trim_newline(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

/// Aborts a spawned task when dropped, so it never outlives its owner.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/audit/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn write(path: &str, operation: Operation) -> Option<KvWrite> {
        Some(KvWrite {
            path: VaultPath::new(Location::new(None, "secret"), path),
            operation,
        })
    }

    #[test]
    fn successful_kv_writes_of_openbao_are_read_with_their_path_and_operation() {
        let cases = [
            ("kv-put", Operation::Write),
            ("kv-put-second", Operation::Write),
            ("kv-patch", Operation::Patch),
            ("kv-delete", Operation::Delete),
            ("kv-undelete", Operation::Undelete),
            ("kv-destroy", Operation::Destroy),
            ("kv-metadata-put", Operation::MetadataWrite),
            ("kv-metadata-patch", Operation::MetadataWrite),
            ("kv-metadata-delete", Operation::MetadataDelete),
        ];
        for (name, op) in cases {
            assert_eq!(parse(&fixture(name)), Ok(write("shop", op)), "{name}");
        }
    }

    #[test]
    fn a_write_in_a_vault_namespace_names_the_namespace_and_the_mount_without_it() {
        assert_eq!(
            parse(&fixture("kv-put-in-namespace")),
            Ok(Some(KvWrite {
                path: VaultPath::new(Location::new(Some("team1"), "kv"), "shop/envs/dev"),
                operation: Operation::Write,
            }))
        );
    }

    #[test]
    fn requests_reads_failures_and_other_engines_are_ignored() {
        for name in [
            "kv-put-request",
            "kv-get",
            "kv-put-cas-mismatch",
            "permission-denied",
            "sys-ui-mounts-read",
        ] {
            assert_eq!(parse(&fixture(name)), Ok(None), "{name}");
        }
    }

    #[test]
    fn garbage_truncated_and_oversized_entries_are_errors_not_panics() {
        let put = fixture("kv-put");
        assert_eq!(parse(b"hello"), Err(EntryError::Malformed));
        assert_eq!(parse(b""), Err(EntryError::Malformed));
        assert_eq!(parse(&put[..put.len() / 2]), Err(EntryError::Malformed));
        assert_eq!(
            parse(b"{\"type\":\"response\"}"),
            Err(EntryError::Malformed)
        );
        assert_eq!(parse(b"[1,2]"), Err(EntryError::Malformed));
        let mut big = put.clone();
        big.resize(MAX_ENTRY_BYTES + 1, b' ');
        assert_eq!(parse(&big), Err(EntryError::Oversized));
        // Odd but well-formed paths stay inside their mount.
        let odd = String::from_utf8(put)
            .unwrap()
            .replace("\"path\":\"secret/data/shop\"", "\"path\":\"secret/data/\"");
        assert_eq!(parse(odd.as_bytes()), Ok(None));
    }

    #[test]
    fn an_entry_keeps_nothing_of_the_request_data() {
        // The parsed value is the path and the operation; the data's HMACs (or raw values of a
        // `log_raw` device) are not part of it.
        let raw = String::from_utf8(fixture("kv-put")).unwrap().replace(
            "hmac-sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "canary-raw-value",
        );
        let parsed = parse(raw.as_bytes()).unwrap().unwrap();
        assert!(!format!("{parsed:?}").contains("canary"));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "192.168.1.5".parse().unwrap();
        assert!(one.contains("192.168.1.5".parse().unwrap()));
        assert!(!one.contains("192.168.1.6".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    type Seen = Arc<Mutex<Vec<Received>>>;

    fn recorder() -> (Seen, Handler) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        (seen, Arc::new(move |r, _| s.lock().unwrap().push(r)))
    }

    /// A listener on a free local port (TCP or UDP, admitting `allow_from`), running until
    /// the returned task is dropped, with what it received.
    async fn listening(tcp: bool, allow_from: Vec<Cidr>) -> (SocketAddr, Seen, AbortOnDrop) {
        let addr = "127.0.0.1:0".parse().unwrap();
        let config = ListenConfig {
            addr,
            tcp,
            allow_from,
        };
        let listener = Listener::bind(config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, handler) = recorder();
        (addr, seen, AbortOnDrop(tokio::spawn(listener.run(handler))))
    }

    async fn wait_for(seen: &Seen, n: usize) -> Vec<Received> {
        for _ in 0..200 {
            if seen.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        seen.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn the_udp_listener_reads_each_datagram_and_survives_garbage() {
        let (addr, seen, _task) = listening(false, Vec::new()).await;
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let put = fixture("kv-put");
        for datagram in [&b"garbage"[..], &put[..40], &put[..], &[0xff, 0xfe][..]] {
            sender.send_to(datagram, addr).await.unwrap();
        }
        let got = wait_for(&seen, 4).await;
        assert_eq!(
            got,
            [
                Received::Entry(Err(EntryError::Malformed)),
                Received::Entry(Err(EntryError::Malformed)),
                Received::Entry(Ok(write("shop", Operation::Write))),
                Received::Entry(Err(EntryError::Malformed)),
            ]
        );
    }

    #[tokio::test]
    async fn datagrams_from_outside_the_allowed_networks_are_refused_unread() {
        let (addr, seen, _task) = listening(false, vec!["10.0.0.0/8".parse().unwrap()]).await;
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender.send_to(&fixture("kv-put"), addr).await.unwrap();
        assert_eq!(wait_for(&seen, 1).await, [Received::Refused]);
    }

    #[tokio::test]
    async fn the_tcp_listener_reads_lines_and_drops_an_oversized_one_whole() {
        use tokio::io::AsyncWriteExt;
        let (addr, seen, _task) = listening(true, Vec::new()).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let put = fixture("kv-put");
        let mut bytes = put.clone();
        bytes.extend(vec![b'x'; MAX_ENTRY_BYTES * 2]);
        bytes.push(b'\n');
        bytes.extend_from_slice(&put);
        bytes.extend_from_slice(b"\nnot json\n");
        stream.write_all(&bytes).await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(
            wait_for(&seen, 4).await,
            [
                Received::Entry(Ok(write("shop", Operation::Write))),
                Received::Entry(Err(EntryError::Oversized)),
                Received::Entry(Ok(write("shop", Operation::Write))),
                Received::Entry(Err(EntryError::Malformed)),
            ]
        );
    }
}
