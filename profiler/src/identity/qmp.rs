//! A small synchronous QMP client: enough to ask a QEMU process read-only questions (device
//! names behind ports and addresses, via `info mtree -f`) without ever stalling the caller.
//!
//! * Every call has a deadline (default [`DEFAULT_TIMEOUT`]): connecting, the greeting and
//!   capabilities negotiation share one, each [`QmpClient::execute`] gets its own. A server
//!   that trickles bytes cannot stretch it: each read waits only for what is left.
//! * QEMU serves one client per QMP monitor. A second connection is accepted by the kernel
//!   (it sits in the listen backlog) but gets no greeting until the first client leaves, so
//!   a missing greeting is reported as a busy monitor.
//! * Replies are JSON objects; QEMU ends each with `\r\n`, but framing here is by JSON value,
//!   so pretty-printed (`pretty=on`) monitors work too. Asynchronous `{"event": ...}`
//!   messages are skipped, `{"error": ...}` becomes an `Err`, and garbage, truncated or
//!   oversized (> [`MAX_MESSAGE_BYTES`]) messages are errors that also retire the connection.
//! * Only read-only commands are sent ([`is_read_only`]): `qmp_capabilities`, `query-*`, and
//!   `human-monitor-command` with an `info ...` command line. The profiler observes; it must
//!   never change a guest.

use std::{
    io::{self, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

use crate::identity::{
    cmdline::QmpEndpoint,
    mtree::{MtreeMap, parse_mtree_flat},
};

/// Default deadline for connecting (greeting included) and for each command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest QMP message accepted. `info mtree -f` of a large q35 guest is tens of KiB.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Whether the profiler may send `command` with `args`: `qmp_capabilities`, `query-*`, and
/// `human-monitor-command` whose `command-line` is an HMP `info` command (one line, no
/// control characters).
pub fn is_read_only(command: &str, args: Option<&Value>) -> bool {
    if command == "qmp_capabilities" {
        return true;
    }
    if let Some(what) = command.strip_prefix("query-") {
        return !what.is_empty()
            && what
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    }
    if command == "human-monitor-command" {
        let Some(line) = args
            .and_then(|a| a.get("command-line"))
            .and_then(Value::as_str)
        else {
            return false;
        };
        return is_hmp_info(line);
    }
    false
}

fn is_hmp_info(line: &str) -> bool {
    !line.chars().any(char::is_control) && line.split_whitespace().next() == Some("info")
}

/// How an endpoint is shown in messages: `unix:/path` or `tcp:host:port`.
pub fn describe(endpoint: &QmpEndpoint) -> String {
    match endpoint {
        QmpEndpoint::Unix(path) => format!("unix:{path}"),
        QmpEndpoint::Tcp { host, port } => format!("tcp:{host}:{port}"),
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
}

/// Why reading a message failed; timeouts are told apart so callers can word them.
enum ReadError {
    Timeout,
    Other(anyhow::Error),
}

/// A connected, capabilities-negotiated QMP session. Dropping it closes the connection,
/// which frees the monitor for the next client.
pub struct QmpClient {
    stream: Stream,
    /// Bytes received but not yet parsed into a message.
    buf: Vec<u8>,
    timeout: Duration,
    endpoint: String,
    next_id: u64,
    /// Set once the byte stream can no longer be trusted (garbage, truncation, EOF).
    broken: Option<String>,
    greeting: Value,
}

/// Connects to `endpoint`, reads the greeting and negotiates capabilities, all within
/// `timeout`. Later commands each get `timeout` too.
pub fn connect(endpoint: &QmpEndpoint, timeout: Duration) -> anyhow::Result<QmpClient> {
    let deadline = Instant::now() + timeout;
    let label = describe(endpoint);
    let stream = match endpoint {
        QmpEndpoint::Unix(path) => Stream::Unix(connect_unix(path, deadline, timeout)?),
        QmpEndpoint::Tcp { host, port } => {
            Stream::Tcp(connect_tcp(host, *port, deadline, timeout)?)
        }
    };
    QmpClient::handshake(stream, label, timeout, deadline)
}

/// Connects to `endpoint`, asks `info mtree -f` and parses it: the names of the devices
/// behind I/O ports and guest physical addresses. An answer with neither an I/O nor a
/// memory flat view is an error (it is probably an HMP error message).
pub fn device_names(endpoint: &QmpEndpoint, timeout: Duration) -> anyhow::Result<MtreeMap> {
    let mut client = connect(endpoint, timeout)?;
    let text = client.hmp("info mtree -f")?;
    let map = parse_mtree_flat(&text);
    if map.is_empty() {
        let first = text.lines().next().unwrap_or("").trim();
        bail!(
            "`info mtree -f` from QMP monitor {} had no I/O or memory flat view; it said: {:?}",
            client.endpoint,
            truncate(first, 200)
        );
    }
    Ok(map)
}

/// A whole session (greeting, capabilities, `info mtree -f`) against a peer that sends
/// `server_bytes` and then closes: what the fuzzer and its regression tests drive.
pub fn session_against(server_bytes: &[u8]) -> anyhow::Result<MtreeMap> {
    let (client, mut server) = UnixStream::pair()?;
    // The peer's half is written up front and closed: the client gets these bytes, then EOF.
    let bytes = server_bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = server.write_all(&bytes);
        let _ = server.shutdown(std::net::Shutdown::Write);
        // Keep reading what the client sends until it hangs up.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut server, &mut sink);
    });
    let timeout = Duration::from_millis(200);
    let result = QmpClient::handshake(
        Stream::Unix(client),
        "fuzz".into(),
        timeout,
        Instant::now() + timeout,
    )
    .and_then(|mut c| {
        let text = c.hmp("info mtree -f")?;
        Ok(crate::identity::mtree::parse_mtree_flat(&text))
    });
    let _ = writer.join();
    result
}

impl QmpClient {
    /// Runs the handshake on an already-connected stream (also used by the tests).
    fn handshake(
        stream: Stream,
        endpoint: String,
        timeout: Duration,
        deadline: Instant,
    ) -> anyhow::Result<Self> {
        let mut client = QmpClient {
            stream,
            buf: Vec::new(),
            timeout,
            endpoint,
            next_id: 1,
            broken: None,
            greeting: Value::Null,
        };
        let greeting = match client.read_message(deadline) {
            Ok(v) => v,
            Err(ReadError::Timeout) => bail!(
                "QMP monitor {} is busy: connected, but no greeting within {:?} (QEMU serves \
                 one QMP client per monitor; another client is probably connected)",
                client.endpoint,
                timeout
            ),
            Err(ReadError::Other(e)) => {
                return Err(e.context(format!(
                    "{} is not a QMP monitor (bad greeting)",
                    client.endpoint
                )));
            }
        };
        if greeting.get("QMP").is_none() {
            bail!(
                "{} is not a QMP monitor: expected a {{\"QMP\": ...}} greeting, got {}",
                client.endpoint,
                truncate(&greeting.to_string(), 200)
            );
        }
        client.greeting = greeting;
        client.execute_until("qmp_capabilities", None, deadline)?;
        Ok(client)
    }

    /// The server's greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version from the greeting as (major, minor, micro), if it says.
    pub fn qemu_version(&self) -> Option<(u64, u64, u64)> {
        let v = self.greeting.get("QMP")?.get("version")?.get("qemu")?;
        Some((
            v.get("major")?.as_u64()?,
            v.get("minor")?.as_u64()?,
            v.get("micro")?.as_u64()?,
        ))
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs a read-only QMP command (see [`is_read_only`]) and returns its `return` value.
    /// Events that arrive meanwhile are skipped; an `error` reply is an `Err` naming the
    /// command, QEMU's error class and description.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.timeout;
        self.execute_until(command, args, deadline)
    }

    /// Runs an HMP `info ...` command through `human-monitor-command`; returns its text.
    pub fn hmp(&mut self, cmd: &str) -> anyhow::Result<String> {
        if !is_hmp_info(cmd) {
            bail!(
                "refusing to send HMP command {cmd:?}: the profiler only sends read-only \
                 `info ...` commands"
            );
        }
        let reply = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": cmd })),
        )?;
        match reply {
            Value::String(s) => Ok(s),
            other => bail!(
                "QMP monitor {}: human-monitor-command {cmd:?} returned {}, not a string",
                self.endpoint,
                truncate(&other.to_string(), 200)
            ),
        }
    }

    fn execute_until(
        &mut self,
        command: &str,
        args: Option<Value>,
        deadline: Instant,
    ) -> anyhow::Result<Value> {
        if !is_read_only(command, args.as_ref()) {
            bail!(
                "refusing to send QMP command {command:?}{}: the profiler only sends read-only \
                 commands (qmp_capabilities, query-*, human-monitor-command \"info ...\")",
                args.map(|a| format!(" {}", truncate(&a.to_string(), 200)))
                    .unwrap_or_default()
            );
        }
        if let Some(why) = &self.broken {
            bail!(
                "QMP connection to {} is unusable after an earlier error: {why}",
                self.endpoint
            );
        }
        let id = format!("profiler-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        if let Err(e) = self.write_all(&bytes, deadline) {
            let e = e.context(format!(
                "cannot send {command:?} to QMP monitor {}",
                self.endpoint
            ));
            self.broken = Some(format!("{e:#}"));
            return Err(e);
        }
        loop {
            let reply = match self.read_message(deadline) {
                Ok(v) => v,
                Err(ReadError::Timeout) => bail!(
                    "QMP monitor {} did not answer {command:?} within {:?}",
                    self.endpoint,
                    self.timeout
                ),
                Err(ReadError::Other(e)) => {
                    return Err(e.context(format!(
                        "QMP monitor {}: reading the reply to {command:?}",
                        self.endpoint
                    )));
                }
            };
            if reply.get("event").is_some() {
                continue;
            }
            // A reply to an earlier command that timed out: not ours.
            if let Some(reply_id) = reply.get("id")
                && reply_id.as_str() != Some(id.as_str())
            {
                continue;
            }
            if let Some(err) = reply.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| truncate(&err.to_string(), 200));
                bail!(
                    "QMP command {command:?} failed on {}: {class}: {desc}",
                    self.endpoint
                );
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            // Anything else (a second greeting, a future message kind) is skipped; the
            // deadline bounds how long that can go on.
        }
    }

    fn write_all(&mut self, mut bytes: &[u8], deadline: Instant) -> anyhow::Result<()> {
        while !bytes.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {:?}", self.timeout);
            }
            self.stream.set_write_timeout(left)?;
            match self.stream.write(bytes) {
                Ok(0) => bail!("connection closed"),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => bail!("timed out after {:?}", self.timeout),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads one JSON object, waiting at most until `deadline`. Framing errors retire the
    /// connection (set `broken`); a timeout does not (the reply may still come, and ids tell
    /// stale replies apart).
    fn read_message(&mut self, deadline: Instant) -> Result<Value, ReadError> {
        let result = self.read_message_inner(deadline);
        if let Err(ReadError::Other(e)) = &result {
            self.broken = Some(format!("{e:#}"));
        }
        result
    }

    fn read_message_inner(&mut self, deadline: Instant) -> Result<Value, ReadError> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut try_parse = true;
        loop {
            if try_parse && let Some(v) = self.take_message().map_err(ReadError::Other)? {
                return Ok(v);
            }
            if self.buf.len() > MAX_MESSAGE_BYTES {
                return Err(ReadError::Other(anyhow!(
                    "message larger than {} MiB (got {} bytes without its end)",
                    MAX_MESSAGE_BYTES >> 20,
                    self.buf.len()
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            self.stream
                .set_read_timeout(left)
                .map_err(|e| ReadError::Other(e.into()))?;
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(ReadError::Timeout),
                Err(e) => return Err(ReadError::Other(anyhow!("read failed: {e}"))),
            };
            if n == 0 {
                let pending = self.buf.iter().filter(|b| !b.is_ascii_whitespace()).count();
                return Err(ReadError::Other(if pending > 0 {
                    anyhow!(
                        "connection closed in the middle of a message ({} bytes received: {})",
                        self.buf.len(),
                        snippet(&self.buf)
                    )
                } else {
                    anyhow!("connection closed by QEMU")
                }));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            // A complete object ends in `}`: parse again only when one may have arrived, or
            // when the buffer does not start like an object (garbage is reported at once).
            let starts_like_object = self
                .buf
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_none_or(|&b| b == b'{');
            try_parse = chunk[..n].contains(&b'}') || !starts_like_object;
        }
    }

    /// Takes the first complete JSON value off `buf`; `None` if more bytes are needed.
    fn take_message(&mut self) -> anyhow::Result<Option<Value>> {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        if start == self.buf.len() {
            self.buf.clear();
            return Ok(None);
        }
        if self.buf[start] != b'{' {
            bail!(
                "not a QMP message (expected a JSON object): {}",
                snippet(&self.buf[start..])
            );
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buf[start..]).into_iter();
        match values.next() {
            Some(Ok(value)) => {
                let end = start + values.byte_offset();
                self.buf.drain(..end);
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => bail!("invalid JSON ({e}): {}", snippet(&self.buf[start..])),
            None => Ok(None),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The first bytes of `bytes`, escaped, for error messages.
fn snippet(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(120)];
    let mut s: String = head.escape_ascii().to_string();
    if bytes.len() > head.len() {
        s.push_str("...");
    }
    format!("\"{s}\"")
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// `connect()` on a Unix socket, bounded by `deadline`. std's blocking connect would wait
/// without limit when the listener's backlog is full, so the socket is non-blocking and a
/// full backlog (`EAGAIN`) is retried until the deadline.
fn connect_unix(path: &str, deadline: Instant, timeout: Duration) -> anyhow::Result<UnixStream> {
    let label = format!("unix:{path}");
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.contains(&0) || bytes.len() >= addr.sun_path.len() {
        bail!(
            "QMP socket path {path:?} is empty, has a NUL byte, or is longer than {} bytes",
            addr.sun_path.len() - 1
        );
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("cannot create a Unix socket");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is open.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // The listener's backlog is full: QEMU is not accepting (busy or hung).
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => {
                if Instant::now() >= deadline {
                    bail!(
                        "QMP monitor {label} is busy: its connection queue stayed full for \
                         {timeout:?} (QEMU serves one QMP client per monitor)"
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(libc::ECONNREFUSED) => {
                return Err(err).with_context(|| {
                    format!("cannot connect to QMP monitor {label}: nobody listens (QEMU exited?)")
                });
            }
            _ => {
                return Err(err).with_context(|| format!("cannot connect to QMP monitor {label}"));
            }
        }
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .context("cannot make the QMP socket blocking")?;
    Ok(stream)
}

fn connect_tcp(
    host: &str,
    port: u16,
    deadline: Instant,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let label = format!("tcp:{host}:{port}");
    // `-qmp tcp:[::1]:4444` keeps the brackets; a wildcard listener is reached locally.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        h => h,
    };
    // Name resolution may block; QMP hosts are in practice numeric or `localhost`.
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve QMP monitor address {label}"))?
        .collect();
    let mut last_err = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) if is_timeout(&e) => {
            bail!("cannot connect to QMP monitor {label}: no answer within {timeout:?}")
        }
        Some(e) => Err(e).with_context(|| format!("cannot connect to QMP monitor {label}")),
        None => bail!("cannot connect to QMP monitor {label}: no address to try"),
    }
}

#[cfg(test)]
mod tests;
