use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixListener,
    thread,
};

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

/// A scripted fake QEMU on the server end of a socket pair: for each received command
/// line, `respond` returns the bytes to send back (already framed).
fn fake_server(
    greeting: Option<&'static str>,
    respond: impl Fn(&Value) -> Vec<u8> + Send + 'static,
) -> (UnixStream, thread::JoinHandle<Vec<Value>>) {
    let (client, server) = UnixStream::pair().unwrap();
    let handle = thread::spawn(move || {
        let mut seen = Vec::new();
        let mut writer = server.try_clone().unwrap();
        if let Some(g) = greeting {
            writer.write_all(format!("{g}\r\n").as_bytes()).unwrap();
        }
        let mut reader = BufReader::new(server);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let cmd: Value = serde_json::from_str(&line).expect("client sends JSON lines");
            line.clear();
            let out = respond(&cmd);
            seen.push(cmd);
            if writer.write_all(&out).is_err() {
                break;
            }
        }
        seen
    });
    (client, handle)
}

fn ok_reply(cmd: &Value, ret: Value) -> Vec<u8> {
    format!("{}\r\n", json!({ "return": ret, "id": cmd["id"] })).into_bytes()
}

fn client_on(stream: UnixStream, timeout: Duration) -> anyhow::Result<QmpClient> {
    QmpClient::handshake(
        Stream::Unix(stream),
        "test".into(),
        timeout,
        Instant::now() + timeout,
    )
}

const HMP_TEXT: &str = "FlatView #0\r\n AS \"I/O\", root: io\r\n Root memory region: io\r\n  0000000000000378-000000000000037f (prio 0, i/o): parallel\r\n\r\n";

#[test]
fn normal_flow() {
    let (stream, server) = fake_server(Some(GREETING), |cmd| {
        match cmd["execute"].as_str().unwrap() {
            "qmp_capabilities" => ok_reply(cmd, json!({})),
            "query-status" => ok_reply(cmd, json!({"status": "running", "running": true})),
            "human-monitor-command" => ok_reply(cmd, json!(HMP_TEXT)),
            other => panic!("unexpected {other}"),
        }
    });
    let mut c = client_on(stream, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(c.qemu_version(), Some((7, 2, 22)));
    let status = c.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running");
    let text = c.hmp("info mtree -f").unwrap();
    assert_eq!(text, HMP_TEXT);
    assert_eq!(
        parse_mtree_flat(&text).name_for_port(0x378),
        Some("parallel")
    );
    drop(c);
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0],
        json!({"execute": "qmp_capabilities", "id": "profiler-1"})
    );
    assert_eq!(
        seen[2]["arguments"],
        json!({"command-line": "info mtree -f"})
    );
}

#[test]
fn events_interleaved_and_split_writes() {
    let (stream, server) = fake_server(Some(GREETING), |cmd| {
        let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RTC_CHANGE", "data": {"offset": 0}}"#;
        let mut out = format!("{event}\r\n{event}\r\n").into_bytes();
        out.extend(ok_reply(cmd, json!({"n": 1})));
        out.extend(format!("{event}\r\n").into_bytes());
        out
    });
    let mut c = client_on(stream, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(c.execute("query-x", None).unwrap(), json!({"n": 1}));
    // The trailing event is skipped on the next command too.
    assert_eq!(c.execute("query-y", None).unwrap(), json!({"n": 1}));
    drop(c);
    server.join().unwrap();

    // A server that writes byte by byte, pretty-printed, still works.
    let (client, server) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let mut w = server.try_clone().unwrap();
        let mut r = BufReader::new(server);
        let pretty = format!(
            "{}\n",
            serde_json::to_string_pretty(&serde_json::from_str::<Value>(GREETING).unwrap())
                .unwrap()
        );
        for b in pretty.bytes() {
            w.write_all(&[b]).unwrap();
        }
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let cmd: Value = serde_json::from_str(&line).unwrap();
        // The client may be gone before the trailing CR LF: ignore write errors.
        for b in ok_reply(&cmd, json!({})) {
            let _ = w.write_all(&[b]);
        }
        let _ = r.read_line(&mut line);
    });
    let c = client_on(client, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(c.qemu_version(), Some((7, 2, 22)));
    drop(c);
    t.join().unwrap();
}

#[test]
fn error_reply_is_a_clear_err_and_the_session_goes_on() {
    let (stream, _server) = fake_server(Some(GREETING), |cmd| {
        if cmd["execute"] == "query-nope" {
            format!(
                "{}\r\n",
                json!({"error": {"class": "CommandNotFound", "desc": "The command query-nope has not been found"}, "id": cmd["id"]})
            )
            .into_bytes()
        } else {
            ok_reply(cmd, json!({}))
        }
    });
    let mut c = client_on(stream, DEFAULT_TIMEOUT).unwrap();
    let err = c.execute("query-nope", None).unwrap_err().to_string();
    crate::testing::assert_contains(&err, "query-nope");
    assert!(
        err.contains("CommandNotFound: The command query-nope has not been found"),
        "{err}"
    );
    assert_eq!(c.execute("query-ok", None).unwrap(), json!({}));
}

#[test]
fn garbage_is_an_error() {
    // An HMP monitor instead of a QMP one.
    let (stream, _s) = fake_server(
        Some("QEMU 7.2.22 monitor - type 'help' for more information"),
        |_| vec![],
    );
    let err = format!("{:#}", client_on(stream, DEFAULT_TIMEOUT).err().unwrap());
    crate::testing::assert_contains(&err, "not a QMP monitor");
    crate::testing::assert_contains(&err, "QEMU 7.2.22 monitor");

    // A JSON greeting without "QMP".
    let (stream, _s) = fake_server(Some(r#"{"hello": 1}"#), |_| vec![]);
    let err = format!("{:#}", client_on(stream, DEFAULT_TIMEOUT).err().unwrap());
    crate::testing::assert_contains(&err, "not a QMP monitor");

    // A client whose every command after the handshake gets `reply`, and its first error.
    let after_handshake = |reply: &'static [u8]| {
        let (stream, server) = fake_server(Some(GREETING), move |cmd| {
            if cmd["execute"] == "qmp_capabilities" {
                ok_reply(cmd, json!({}))
            } else {
                reply.to_vec()
            }
        });
        let mut c = client_on(stream, DEFAULT_TIMEOUT).unwrap();
        let err = format!("{:#}", c.execute("query-a", None).unwrap_err());
        (c, err, server)
    };

    // Broken JSON in a reply retires the connection.
    let (mut c, err, _s) = after_handshake(b"{\"return\": [1, 2,, 3]}\r\n");
    crate::testing::assert_contains(&err, "invalid JSON");
    let err = format!("{:#}", c.execute("query-b", None).unwrap_err());
    crate::testing::assert_contains(&err, "unusable after an earlier error");

    // A non-object top-level value.
    let (_, err, _s) = after_handshake(b"[\"return\"]\r\n");
    crate::testing::assert_contains(&err, "expected a JSON object");

    // A reply cut off by the server closing the connection.
    let (client, server) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let mut w = server.try_clone().unwrap();
        w.write_all(format!("{GREETING}\r\n").as_bytes()).unwrap();
        let mut r = BufReader::new(server);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        w.write_all(b"{\"return\": {\"half").unwrap();
    });
    let err = format!("{:#}", client_on(client, DEFAULT_TIMEOUT).err().unwrap());
    assert!(
        err.contains("connection closed in the middle of a message"),
        "{err}"
    );
    t.join().unwrap();

    // Deterministic fuzz of reply bytes: errors, never panics or hangs.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..30 {
        let mut junk: Vec<u8> = (0..64)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let alphabet = b"{}[]\":,\r\n abc0\\";
                alphabet[(state % alphabet.len() as u64) as usize]
            })
            .collect();
        junk.extend_from_slice(b"\n");
        let (stream, _s) = fake_server(Some(GREETING), move |cmd| {
            if cmd["execute"] == "qmp_capabilities" {
                ok_reply(cmd, json!({}))
            } else {
                junk.clone()
            }
        });
        // A short wait for the junk reply, not for the handshake (a busy host may take
        // longer than that to run the fake server).
        let mut c = QmpClient::handshake(
            Stream::Unix(stream),
            "test".into(),
            Duration::from_millis(100),
            Instant::now() + LATE,
        )
        .unwrap();
        let _ = c.execute("query-a", None);
    }
}

/// Past the deadline by at most this: a busy host may be late to wake the client.
const LATE: Duration = Duration::from_secs(5);

#[test]
fn silent_server_times_out_within_the_deadline() {
    // No greeting: the monitor is busy.
    let (stream, _s) = fake_server(None, |_| vec![]);
    let started = Instant::now();
    let err = client_on(stream, Duration::from_millis(300))
        .err()
        .unwrap()
        .to_string();
    let took = started.elapsed();
    crate::testing::assert_contains(&err, "is busy");
    assert!(
        took >= Duration::from_millis(300) && took < LATE,
        "{took:?}"
    );

    // A greeting, then silence on a command.
    let (stream, _s) = fake_server(Some(GREETING), |cmd| {
        if cmd["execute"] == "qmp_capabilities" {
            ok_reply(cmd, json!({}))
        } else {
            vec![]
        }
    });
    let mut c = client_on(stream, Duration::from_millis(300)).unwrap();
    let started = Instant::now();
    let err = c.execute("query-status", None).unwrap_err().to_string();
    let took = started.elapsed();
    crate::testing::assert_contains(&err, "did not answer \"query-status\"");
    assert!(took < LATE, "{took:?}");

    // A server trickling bytes of an endless event keeps resetting per-read timeouts,
    // but not the deadline: the client gives up long before the 10 s trickle ends.
    let (client, server) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let mut w = server;
        let _ = w.write_all(format!("{GREETING}\r\n").as_bytes());
        let _ = w.write_all(b"{\"event\": \"X\", \"data\": \"");
        for _ in 0..500 {
            if w.write_all(b"a").is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let started = Instant::now();
    let err = client_on(client, Duration::from_millis(300))
        .err()
        .unwrap()
        .to_string();
    assert!(started.elapsed() < LATE, "{err}");
    t.join().unwrap();
}

#[test]
fn oversized_reply_is_an_error() {
    let (stream, _s) = fake_server(Some(GREETING), |cmd| {
        if cmd["execute"] == "qmp_capabilities" {
            ok_reply(cmd, json!({}))
        } else {
            // 5 MiB of a JSON string that never ends within the limit.
            let mut out = b"{\"return\": \"".to_vec();
            out.resize(5 << 20, b'}');
            out.extend_from_slice(b"\"}\r\n");
            out
        }
    });
    let mut c = client_on(stream, Duration::from_secs(10)).unwrap();
    let err = format!("{:#}", c.execute("query-big", None).unwrap_err());
    crate::testing::assert_contains(&err, "larger than 4 MiB");

    // Just under the limit is fine.
    let (stream, _s) = fake_server(Some(GREETING), |cmd| {
        if cmd["execute"] == "qmp_capabilities" {
            ok_reply(cmd, json!({}))
        } else {
            ok_reply(cmd, json!("x".repeat(3 << 20)))
        }
    });
    let mut c = client_on(stream, Duration::from_secs(10)).unwrap();
    assert_eq!(
        c.execute("query-big", None)
            .unwrap()
            .as_str()
            .unwrap()
            .len(),
        3 << 20
    );
}

#[test]
fn only_read_only_commands_are_sent() {
    let hmp = |line: &str| json!({ "command-line": line });
    assert!(is_read_only("qmp_capabilities", None));
    assert!(is_read_only("query-status", None));
    assert!(is_read_only(
        "query-named-block-nodes",
        Some(&json!({"flat": true}))
    ));
    assert!(is_read_only(
        "human-monitor-command",
        Some(&hmp("info mtree -f"))
    ));
    assert!(is_read_only(
        "human-monitor-command",
        Some(&hmp("  info qtree"))
    ));
    for (cmd, args) in [
        ("quit", None),
        ("stop", None),
        ("system_reset", None),
        ("device_del", Some(json!({"id": "usb0"}))),
        ("query-", None),
        ("query-x; quit", None),
        ("Query-status", None),
        ("human-monitor-command", None),
        ("human-monitor-command", Some(hmp("quit"))),
        ("human-monitor-command", Some(hmp("information"))),
        ("human-monitor-command", Some(hmp("infox mtree"))),
        ("human-monitor-command", Some(hmp("info mtree\nquit"))),
        ("human-monitor-command", Some(hmp("system_powerdown"))),
        ("human-monitor-command", Some(json!({"command-line": 5}))),
    ] {
        assert!(!is_read_only(cmd, args.as_ref()), "{cmd} {args:?}");
    }

    // Enforced in execute/hmp: nothing reaches the server.
    let (stream, server) = fake_server(Some(GREETING), |cmd| ok_reply(cmd, json!({})));
    let mut c = client_on(stream, DEFAULT_TIMEOUT).unwrap();
    let err = c.execute("quit", None).unwrap_err().to_string();
    assert!(
        err.contains("refusing to send QMP command \"quit\""),
        "{err}"
    );
    let err = c
        .execute("human-monitor-command", Some(hmp("quit")))
        .unwrap_err()
        .to_string();
    crate::testing::assert_contains(&err, "refusing");
    let err = c.hmp("system_reset").unwrap_err().to_string();
    crate::testing::assert_contains(&err, "refusing to send HMP command");
    drop(c);
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 1, "only qmp_capabilities was sent: {seen:?}");
}

/// Serves one QMP client like QEMU: greets it and answers every command, HMP commands with
/// `hmp`, until it leaves.
fn serve_hmp<S: std::io::Read + Write + TryCloneStream>(s: S, hmp: &str) {
    let mut w = s.try_clone_stream();
    w.write_all(format!("{GREETING}\r\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap_or(0) > 0 {
        let cmd: Value = serde_json::from_str(&line).unwrap();
        line.clear();
        let ret = if cmd["execute"] == "human-monitor-command" {
            json!(hmp)
        } else {
            json!({})
        };
        w.write_all(&ok_reply(&cmd, ret)).unwrap();
    }
}

/// A socket a second handle to which can be had (`UnixStream`, `TcpStream`).
trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> Self;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> Self {
        self.try_clone().unwrap()
    }
}

impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> Self {
        self.try_clone().unwrap()
    }
}

#[test]
fn unix_socket_connect_busy_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.qmp");
    let listener = UnixListener::bind(&path).unwrap();
    let endpoint = QmpEndpoint::Unix(path.to_str().unwrap().into());
    // Serve exactly one client, like QEMU: greet it, answer it, keep it.
    let server = thread::spawn(move || {
        serve_hmp(listener.accept().unwrap().0, HMP_TEXT);
        listener
    });
    let mut first = connect(&endpoint, DEFAULT_TIMEOUT).unwrap();
    // The second client sits in the backlog without a greeting.
    let started = Instant::now();
    let err = connect(&endpoint, Duration::from_millis(400))
        .err()
        .unwrap()
        .to_string();
    crate::testing::assert_contains(&err, "is busy");
    crate::testing::assert_contains(&err, &format!("unix:{}", path.display()));
    assert!(started.elapsed() < LATE, "{:?}", started.elapsed());
    assert!(first.hmp("info mtree -f").unwrap().contains("parallel"));
    drop(first);
    drop(server.join().unwrap());

    let missing = QmpEndpoint::Unix(dir.path().join("nope.qmp").to_str().unwrap().into());
    let err = format!("{:#}", connect(&missing, DEFAULT_TIMEOUT).err().unwrap());
    crate::testing::assert_contains(&err, "cannot connect to QMP monitor unix:");
    crate::testing::assert_contains(&err, "No such file");

    // A socket file whose listener is gone.
    let stale = dir.path().join("stale.qmp");
    drop(UnixListener::bind(&stale).unwrap());
    let err = format!(
        "{:#}",
        connect(
            &QmpEndpoint::Unix(stale.to_str().unwrap().into()),
            DEFAULT_TIMEOUT
        )
        .err()
        .unwrap()
    );
    crate::testing::assert_contains(&err, "nobody listens");

    let long = QmpEndpoint::Unix(format!("/tmp/{}", "x".repeat(200)));
    let err = connect(&long, DEFAULT_TIMEOUT).err().unwrap().to_string();
    crate::testing::assert_contains(&err, "longer than 107 bytes");
}

#[test]
fn tcp_connect_and_device_names() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || serve_hmp(listener.accept().unwrap().0, HMP_TEXT));
    let endpoint = QmpEndpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let map = device_names(&endpoint, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(map.name_for_port(0x37a), Some("parallel"));
    server.join().unwrap();
}

#[test]
fn device_names_rejects_an_unparsable_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.qmp");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        serve_hmp(
            listener.accept().unwrap().0,
            "unknown command: 'info mtree'\r\n",
        );
    });
    let endpoint = QmpEndpoint::Unix(path.to_str().unwrap().into());
    let err = device_names(&endpoint, DEFAULT_TIMEOUT)
        .unwrap_err()
        .to_string();
    crate::testing::assert_contains(&err, "no I/O or memory flat view");
    crate::testing::assert_contains(&err, "unknown command");
    server.join().unwrap();
}
