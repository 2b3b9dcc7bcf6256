//! The end-to-end harness: real `keytrail-collector` and `keytrail-agent` processes on
//! loopback, in temporary directories, with certificates from `keytrail-collector certs`.
//!
//! Every listener binds port 0; the harness reads the bound addresses from the processes'
//! JSON start-up log line. Every wait has a deadline and fails with the processes' logs.

pub mod fake_upstream;
pub mod faultnet;
pub mod load;
pub mod traffic;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the binaries are: next to this test executable's `deps/` folder. They are built
/// (or found up to date) once per test process, so `cargo test -p keytrail-tests` never runs
/// stale binaries; `KT_NO_BUILD=1` skips that for pre-built trees.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // A test runs from target/<profile>/deps/, a bench binary from target/<profile>/.
        let parent = exe.parent().expect("target/<profile>");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target/<profile>").to_path_buf()
        } else {
            parent.to_path_buf()
        };
        if std::env::var_os("KT_NO_BUILD").is_none() {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "keytrail-agent", "-p", "keytrail-collector"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build");
            assert!(status.success(), "building the binaries failed");
        }
        dir
    });
    dir.join(name)
}

/// A temporary directory removed on drop (kept when `KT_KEEP` is set, for debugging).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kt-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A sandbox: a PKI with agents `agent-a` and `agent-b`, a fingerprint secret, and room for
/// the processes' data and logs.
pub struct Sandbox {
    pub dir: TempDir,
    pub pki: PathBuf,
    pub secret: PathBuf,
}

pub const SECRET: &str = "e2e-fingerprint-secret";

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        let dir = TempDir::new(tag);
        let pki = dir.path().join("pki");
        let out = Command::new(bin("keytrail-collector"))
            .args(["certs", "--out"])
            .arg(&pki)
            .args(["--agent", "agent-a", "--agent", "agent-b"])
            .output()
            .expect("running keytrail-collector certs");
        assert!(
            out.status.success(),
            "certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secret = dir.path().join("fingerprint.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        set_mode(&secret, 0o600);
        Sandbox { dir, pki, secret }
    }

    /// A second, unrelated CA with an `agent-a` certificate: what a stranger would have.
    pub fn rogue_pki(&self) -> PathBuf {
        let rogue = self.dir.path().join("rogue-pki");
        let out = Command::new(bin("keytrail-collector"))
            .args(["certs", "--out"])
            .arg(&rogue)
            .args(["--agent", "agent-a"])
            .output()
            .unwrap();
        assert!(out.status.success());
        rogue
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A running process with its log file.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(file).env("KEYTRAIL_LOG", "info");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child: Some(child),
            log,
            name: name.to_string(),
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child process id.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not stop on SIGTERM\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        format!("--- {} log (tail) ---\n{}", self.name, &text[start..])
    }

    /// Waits for the JSON start-up line and returns its `fields`.
    fn started_fields(&self, message: &str, after: usize) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            for line in text.get(after..).unwrap_or("").lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    if v["fields"]["message"] == message {
                        return v["fields"].clone();
                    }
                }
            }
            if Instant::now() > deadline {
                panic!("{} did not start\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Options for a collector.
#[derive(Clone)]
pub struct CollectorOpts {
    pub mtls: bool,
    pub token: Option<String>,
    pub max_batch_events: Option<u32>,
    /// Receive port to reuse (after a restart); 0 = any.
    pub receive_port: u16,
    /// Appended to the config file (e.g. `[plans.pro]` tables).
    pub extra_toml: String,
}

impl Default for CollectorOpts {
    fn default() -> Self {
        CollectorOpts {
            mtls: true,
            token: None,
            max_batch_events: None,
            receive_port: 0,
            extra_toml: String::new(),
        }
    }
}

pub struct Collector {
    pub proc: Proc,
    pub receive: SocketAddr,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    config: PathBuf,
    token: Option<String>,
}

impl Collector {
    pub fn start(sb: &Sandbox, opts: CollectorOpts) -> Collector {
        let data_dir = sb.path("collector-data");
        let config = sb.path("collector.toml");
        let mut text = format!(
            "data_dir = {:?}\n[receive]\nlisten = \"127.0.0.1:{}\"\ncert = {:?}\nkey = {:?}\n",
            data_dir,
            opts.receive_port,
            sb.pki.join("collector.crt"),
            sb.pki.join("collector.key"),
        );
        if opts.mtls {
            text += &format!("client_ca = {:?}\n", sb.pki.join("ca.crt"));
        }
        if let Some(n) = opts.max_batch_events {
            text += &format!("max_batch_events = {n}\n");
        }
        text += "[api]\nlisten = \"127.0.0.1:0\"\n";
        if let Some(t) = &opts.token {
            let tf = sb.path("api.token");
            std::fs::write(&tf, t).unwrap();
            text += &format!("token_file = {tf:?}\n");
        }
        text += "[retention]\ndedup_window = \"3650d\"\nraw_events = \"3650d\"\n";
        text += &opts.extra_toml;
        std::fs::write(&config, text).unwrap();
        let mut c = Collector {
            proc: Proc {
                child: None,
                log: sb.path("collector.log"),
                name: "collector".into(),
            },
            receive: ([0, 0, 0, 0], 0).into(),
            api: ([0, 0, 0, 0], 0).into(),
            data_dir,
            config,
            token: opts.token.clone(),
        };
        c.restart();
        c
    }

    /// Starts (again) on the same receive port and data dir.
    pub fn restart(&mut self) {
        self.proc.kill9();
        if self.receive.port() != 0 {
            let text = std::fs::read_to_string(&self.config).unwrap();
            let text = text.replace(
                "listen = \"127.0.0.1:0\"\ncert",
                &format!("listen = \"{}\"\ncert", self.receive),
            );
            std::fs::write(&self.config, text).unwrap();
        }
        let after = self.proc.log_len();
        let mut cmd = Command::new(bin("keytrail-collector"));
        cmd.args(["--log-format", "json", "serve", "--config"])
            .arg(&self.config);
        self.proc = Proc::spawn("collector", cmd, self.proc.log.clone());
        let f = self.proc.started_fields("keytrail-collector started", after);
        self.receive = f["receive"].as_str().unwrap().parse().unwrap();
        self.api = f["api"].as_str().unwrap().parse().unwrap();
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.receive.port())
    }

    pub fn stats(&self) -> serde_json::Value {
        let auth = self.token.as_ref().map(|t| format!("Bearer {}", t.trim()));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (status, body) = http(self.api, "GET", "/v1/stats", &headers, b"").expect("GET /v1/stats");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Pages through `GET /v1/events` (newest first, 1,000 a page), handing each page's events
    /// and the cursor to the next page to `page`.
    pub fn for_each_event_page(&self, mut page: impl FnMut(&[serde_json::Value], Option<&str>)) {
        let auth = self.token.as_ref().map(|t| format!("Bearer {}", t.trim()));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/events?limit=1000&cursor={c}"),
                None => "/v1/events?limit=1000".to_string(),
            };
            let (status, body) = http(self.api, "GET", &path, &headers, b"").expect("GET /v1/events");
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let next = v["next_cursor"].as_str().map(str::to_string);
            page(v["events"].as_array().map_or(&[][..], Vec::as_slice), next.as_deref());
            match next {
                Some(c) => cursor = Some(c),
                None => return,
            }
        }
    }

    /// Every event id the collector serves, newest first (duplicates included).
    pub fn event_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        self.for_each_event_page(|events, _| {
            ids.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        });
        ids
    }

    pub fn stored(&self) -> u64 {
        self.stats()["events_stored"].as_u64().unwrap()
    }

    /// Waits until `events_stored` reaches `n` (and checks it does not pass it).
    pub fn wait_stored(&self, n: u64, within: Duration, agent: Option<&Agent>) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.stored();
            assert!(
                s <= n,
                "stored {s} events, more than the {n} sent\n{}",
                self.proc.log_text()
            );
            if s == n {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "collector stored {s} of {n} events\n{}\n{}",
                    self.proc.log_text(),
                    agent.map(|a| a.proc.log_text()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Options for an agent.
#[derive(Clone)]
pub struct AgentOpts {
    pub agent_id: String,
    /// Certificate and key file stems in the sandbox PKI (or a rogue one); `None` = no client cert.
    pub cert: Option<(PathBuf, PathBuf)>,
    pub max_bytes: String,
    pub when_full: String,
    pub batch_max_events: u32,
    pub batch_timeout: String,
    pub stall_after: String,
    /// The shipper's longest wait between retries (the harness's is short; agents ship with 30 s).
    pub backoff_max: String,
    /// Appended to the generated config (e.g. a `[proxy]` section).
    pub extra_toml: String,
    /// Extra environment for the process (e.g. libfaketime).
    pub env: Vec<(String, String)>,
}

impl AgentOpts {
    pub fn new(sb: &Sandbox, agent_id: &str) -> AgentOpts {
        AgentOpts {
            agent_id: agent_id.to_string(),
            cert: Some((
                sb.pki.join(format!("{agent_id}.crt")),
                sb.pki.join(format!("{agent_id}.key")),
            )),
            max_bytes: "256MiB".into(),
            when_full: "reject".into(),
            batch_max_events: 500,
            batch_timeout: "100ms".into(),
            stall_after: "2s".into(),
            backoff_max: "500ms".into(),
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

pub struct Agent {
    pub proc: Proc,
    pub ingest: SocketAddr,
    /// The proxy's address, when `[proxy]` is configured.
    pub proxy: Option<SocketAddr>,
    pub data_dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn start(sb: &Sandbox, collector_url: &str, opts: AgentOpts) -> Agent {
        let data_dir = sb.path(&format!("agent-data-{}", opts.agent_id));
        let config = sb.path(&format!("agent-{}.toml", opts.agent_id));
        let mut text = format!(
            "agent_id = {:?}\n[context]\nregion = \"eu-west-1\"\ndeployment = \"on_prem\"\n\
             [ingest]\nlisten = \"127.0.0.1:0\"\n\
             [buffer]\ndir = {:?}\nmax_bytes = {:?}\nwhen_full = {:?}\n\
             [ship]\ncollector = {:?}\nca = {:?}\nbatch_max_events = {}\nbatch_timeout = {:?}\n\
             stall_after = {:?}\nbackoff_max = {:?}\nrequest_timeout = \"5s\"\n",
            opts.agent_id,
            data_dir,
            opts.max_bytes,
            opts.when_full,
            collector_url,
            sb.pki.join("ca.crt"),
            opts.batch_max_events,
            opts.batch_timeout,
            opts.stall_after,
            opts.backoff_max,
        );
        if let Some((c, k)) = &opts.cert {
            text += &format!("cert = {c:?}\nkey = {k:?}\n");
        }
        text += &format!("[privacy]\nfingerprint_secret_file = {:?}\n", sb.secret);
        text += &opts.extra_toml;
        std::fs::write(&config, text).unwrap();
        let log = sb.path(&format!("agent-{}.log", opts.agent_id));
        let mut a = Agent {
            proc: Proc {
                child: None,
                log,
                name: format!("agent {}", opts.agent_id),
            },
            ingest: ([0, 0, 0, 0], 0).into(),
            proxy: None,
            data_dir,
            config,
            env: opts.env.clone(),
        };
        a.restart();
        a
    }

    pub fn restart(&mut self) {
        self.proc.kill9();
        let after = self.proc.log_len();
        let mut cmd = Command::new(bin("keytrail-agent"));
        cmd.args(["--log-format", "json", "run", "--config"]).arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Proc::spawn(&self.proc.name.clone(), cmd, self.proc.log.clone());
        let f = self.proc.started_fields("keytrail-agent started", after);
        self.ingest = f["ingest"].as_str().unwrap().parse().unwrap();
        self.proxy = f["proxy"].as_str().and_then(|a| a.parse().ok());
    }

    /// The agent's config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Posts NDJSON; returns status and body, or `None` when the connection failed.
    pub fn post_ndjson(&self, lines: &[String]) -> Option<(u16, String)> {
        post_ndjson_at(self.ingest, &lines.join("\n"))
    }

    /// Posts until a 202, retrying on connection errors and 503 (what a well-behaved SDK does).
    pub fn post_until_accepted(&self, lines: &[String], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            match self.post_ndjson(lines) {
                Some((202, _)) => return,
                Some((503, _)) | None => {}
                Some((s, b)) => panic!("unexpected answer {s}: {b}"),
            }
            assert!(Instant::now() < deadline, "no 202 in time\n{}", self.proc.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (s, b) = http(self.ingest, "GET", path, &[], b"").expect("agent answers");
        (s, serde_json::from_str(&b).unwrap_or(serde_json::Value::Null))
    }

    /// Waits until `/readyz` answers `want` (200 or 503); returns its body.
    pub fn wait_ready(&self, want: u16, within: Duration) -> serde_json::Value {
        self.wait_readyz(|s, _| s == want, &want.to_string(), within)
    }

    /// Waits until `/readyz` is 503 for a reason containing `needle` (an agent is also not
    /// ready, for another reason, before its first contact with the collector).
    pub fn wait_not_ready_for(&self, needle: &str, within: Duration) -> serde_json::Value {
        self.wait_readyz(
            |s, v| s == 503 && v["reason"].as_str().unwrap_or_default().contains(needle),
            &format!("503 for {needle:?}"),
            within,
        )
    }

    /// Polls `/readyz` until `done(status, body)`; returns the body.
    fn wait_readyz(
        &self,
        done: impl Fn(u16, &serde_json::Value) -> bool,
        wanted: &str,
        within: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let (s, v) = self.get_json("/readyz");
            if done(s, &v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "readyz stayed {s} ({v}), wanted {wanted}\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; `None` when the connection failed.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).ok()?;
    // A server may answer (413) and close before the whole body is sent: still read the answer.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status: u16 = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let body = if text.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    Some((status, body))
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sets a file's permission bits.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `POST /v1/events` with an NDJSON body to an agent's ingest address (for callers that follow
/// the address across restarts).
pub fn post_ndjson_at(ingest: SocketAddr, body: &str) -> Option<(u16, String)> {
    http(
        ingest,
        "POST",
        "/v1/events",
        &[("Content-Type", "application/x-ndjson")],
        body.as_bytes(),
    )
}

/// A validation event with a stable id, as NDJSON.
pub fn validation(id: &str, license: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"license.validated","license":"{license}","plan":"pro","time":"2026-11-01T10:00:00Z"}}"#
    )
}

/// `n` validation events `{prefix}-0..n`.
pub fn validations(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| validation(&format!("{prefix}-{i}"), &format!("lic-{}", i % 50)))
        .collect()
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

/// Posts raw bytes to the collector's receive port over TLS as the given agent (certificate
/// and key from the sandbox PKI), like an agent would; returns status and body.
pub fn post_batch_as(sb: &Sandbox, collector: &Collector, agent: Option<&str>, body: &[u8]) -> Option<(u16, String)> {
    receive_request_as(sb, collector, agent, "POST /v1/batches HTTP/1.1", body)
}

/// Any request to the collector's receive port over TLS as the given agent; `request_line` is
/// e.g. `GET /v1/ping HTTP/1.1`.
pub fn receive_request_as(
    sb: &Sandbox,
    collector: &Collector,
    agent: Option<&str>,
    request_line: &str,
    body: &[u8],
) -> Option<(u16, String)> {
    keytrail_common::tls::install_crypto_provider();
    let ca = sb.pki.join("ca.crt");
    let pair = agent.map(|a| (sb.pki.join(format!("{a}.crt")), sb.pki.join(format!("{a}.key"))));
    let config =
        keytrail_common::tls::client_config(&ca, pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))).ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).ok()?;
    let tcp = TcpStream::connect_timeout(&collector.receive, Duration::from_secs(5)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let head = format!(
        "{request_line}\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-keytrail-batch\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).ok()?;
    let _ = tls.write_all(body);
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status: u16 = text.split(' ').nth(1)?.parse().ok()?;
    Some((
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}
