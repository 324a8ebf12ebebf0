//! A real three-node Garage cluster on loopback, for integration tests.
//!
//! [`GarageCluster::start`] writes one config per node under a temp dir
//! (replication factor 3, consistency mode "consistent", LMDB metadata, or
//! SQLite if LMDB will not start twice; a node that exits while starting is
//! moved to fresh ports first), launches `garage server` for each, and
//! drives the setup with the `garage` CLI exactly as an operator would:
//!
//! ```text
//! garage -c NI node id; garage -c NI status             (per node, until its RPC answers)
//! garage -c N0 node connect ID1@127.0.0.1:RPC1           (and ID2)
//! garage -c N0 status                                    (until all 3 are healthy)
//! garage -c N0 layout assign -z dc1 -c 1G ID0 ID1 ID2
//! garage -c N0 layout apply --version 1
//! garage -c N0 bucket create BUCKET
//! garage -c N0 key create wharf-test-key                 (key ID and secret parsed from it)
//! garage -c N0 bucket allow --read --write --owner BUCKET --key KEYID
//! ```
//!
//! and then polls until an S3 PUT on node 0 reads back through every node.
//! Every wait polls against one overall deadline; nothing sleeps blindly.
//! Each node's stdout/stderr goes to `node-I.log` in the temp dir, and every
//! error carries the tail of those logs. Dropping the cluster kills the nodes
//! (SIGKILL) and removes the temp dir, unless `WHARF_GARAGE_KEEP` is set.

// Each test binary that includes `common` uses a different subset.
#![allow(dead_code)]

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStoreExt, PutPayload, RetryConfig};
use std::cell::{Cell, RefCell};
use std::fs::{self, File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nodes in the cluster (and the replication factor).
pub const NODES: usize = 3;
const REGION: &str = "garage";
/// The whole of `start` must finish within this.
const START_BUDGET: Duration = Duration::from_secs(60);
/// One CLI invocation may take at most this long.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(100);
/// Lines of each node's log quoted in an error.
const LOG_TAIL_LINES: usize = 25;
const KEY_NAME: &str = "wharf-test-key";
const READY_OBJECT: &str = ".wharf-garage-ready";

pub struct GarageCluster {
    // Drop order: `Drop::drop` kills the children first, then `dir` goes.
    dir: tempfile::TempDir,
    bin: PathBuf,
    rpc_secret: String,
    children: RefCell<Vec<Option<Child>>>,
    configs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    rpc_ports: Vec<u16>,
    s3_ports: Vec<u16>,
    engines: Vec<&'static str>,
    node_ids: Vec<String>,
    key_id: String,
    secret: String,
    bucket: String,
    cli_runs: Cell<usize>,
}

impl GarageCluster {
    /// Finds the garage binary: `$WHARF_GARAGE_BIN`, else `garage` on PATH,
    /// else None.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("WHARF_GARAGE_BIN") {
            if !p.is_empty() {
                // Returned even if missing: `start` then says so, rather than
                // the test silently skipping.
                return Some(PathBuf::from(p));
            }
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("garage"))
            .find(|p| {
                fs::metadata(p)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
    }

    /// Starts 3 nodes on loopback, forms the cluster, creates `bucket` and
    /// an access key allowed read+write+owner on it, and waits until an S3
    /// PUT/GET works through every node. Errors carry the nodes' log tails.
    pub fn start(bin: &Path, bucket: &str) -> Result<GarageCluster, String> {
        let deadline = Instant::now() + START_BUDGET;
        if !bin.is_file() {
            return Err(format!("garage binary {} does not exist", bin.display()));
        }
        let dir = tempfile::Builder::new()
            .prefix("wharf-garage-")
            .tempdir()
            .map_err(|e| format!("creating a temp dir for the garage cluster: {e}"))?;
        let ports = free_ports(2 * NODES)?;
        let mut c = GarageCluster {
            dir,
            bin: bin.to_path_buf(),
            rpc_secret: hex::encode(rand::random::<[u8; 32]>()),
            children: RefCell::new((0..NODES).map(|_| None).collect()),
            configs: Vec::new(),
            logs: Vec::new(),
            rpc_ports: ports[..NODES].to_vec(),
            s3_ports: ports[NODES..].to_vec(),
            engines: vec!["lmdb"; NODES],
            node_ids: Vec::new(),
            key_id: String::new(),
            secret: String::new(),
            bucket: bucket.to_string(),
            cli_runs: Cell::new(0),
        };
        for i in 0..NODES {
            c.configs.push(c.dir.path().join(format!("node-{i}.toml")));
            c.logs.push(c.dir.path().join(format!("node-{i}.log")));
        }
        // From here on an early return drops `c`, which kills what started.

        for i in 0..NODES {
            c.launch(i).map_err(|e| c.fail(&e))?;
        }
        for i in 0..NODES {
            let mut exits = 0;
            let id = loop {
                match c.wait_node_ready(i, deadline) {
                    Ok(id) => break id,
                    Err(NodeWait::Exited(why)) if exits < 2 => {
                        exits += 1;
                        // The ports found free may have been taken since (by
                        // another test's cluster, or as the local port of an
                        // outgoing connection): Garage panics when it cannot
                        // bind. The node has met no peer yet, so it can move.
                        let p = free_ports(2).map_err(|e| c.fail(&e))?;
                        c.rpc_ports[i] = p[0];
                        c.s3_ports[i] = p[1];
                        // Twice: LMDB would not open here (e.g. no mmap);
                        // SQLite then.
                        if exits == 2 {
                            c.engines[i] = "sqlite";
                        }
                        eprintln!(
                            "garage node {i}: {why}; retrying on new ports with db_engine = \"{}\"",
                            c.engines[i]
                        );
                        c.launch(i).map_err(|e| c.fail(&e))?;
                    }
                    Err(e) => return Err(c.fail(&e.message())),
                }
            };
            c.node_ids.push(id);
        }

        // Introduce nodes 1 and 2 to node 0; they learn of each other from it.
        for i in 1..NODES {
            let peer = format!("{}@127.0.0.1:{}", c.node_ids[i], c.rpc_ports[i]);
            c.cli_retry(0, &["node", "connect", &peer], deadline, "connecting nodes")?;
        }
        c.wait_healthy(deadline)?;

        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        assign.extend(c.node_ids.iter().map(String::as_str));
        c.cli_retry(0, &assign, deadline, "assigning the layout")?;
        // Not retried: a retry after a success would fail on the version.
        c.cli(
            0,
            &["layout", "apply", "--version", "1"],
            c.cli_timeout(deadline),
        )
        .map_err(|e| c.fail(&format!("applying the layout: {e}")))?;

        let bucket_owned = c.bucket.clone();
        c.cli_retry_until(
            0,
            &["bucket", "create", &bucket_owned],
            deadline,
            "creating the bucket",
            // A timed-out first try may still have created it.
            |err| err.to_ascii_lowercase().contains("already"),
        )?;
        let created = c.cli_retry(0, &["key", "create", KEY_NAME], deadline, "creating a key")?;
        let (key_id, secret) = match parse_key(&created) {
            Some(k) => k,
            None => {
                let info = c.cli_retry(
                    0,
                    &["key", "info", "--show-secret", KEY_NAME],
                    deadline,
                    "reading the key",
                )?;
                parse_key(&info).ok_or_else(|| {
                    c.fail(&format!(
                        "no key ID and secret in `garage key create` output:\n{created}\n\
                         nor in `garage key info --show-secret`:\n{info}"
                    ))
                })?
            }
        };
        c.key_id = key_id;
        c.secret = secret;
        let key_id = c.key_id.clone();
        c.cli_retry(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                &bucket_owned,
                "--key",
                &key_id,
            ],
            deadline,
            "allowing the key on the bucket",
        )?;

        c.wait_s3(deadline)?;
        Ok(c)
    }

    /// `http://127.0.0.1:PORT` of node `i`'s S3 API.
    pub fn endpoint(&self, i: usize) -> String {
        assert!(i < NODES, "garage node {i} does not exist (0..{NODES})");
        format!("http://127.0.0.1:{}", self.s3_ports[i])
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The temp dir holding configs, data and `node-I.log` files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment a client needs: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, AWS_ENDPOINT_URL (node 0), AWS_ALLOW_HTTP=true.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint(0)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A second access key that may only read the bucket: (key id, secret).
    pub fn read_only_key(&self) -> Result<(String, String), String> {
        let t = Duration::from_secs(10);
        let name = format!("wharf-ro-{}", self.cli_runs.get());
        let created = self.cli(0, &["key", "create", &name], t)?;
        let (id, secret) = parse_key(&created).ok_or_else(|| {
            format!("no key ID and secret in `garage key create` output:\n{created}")
        })?;
        self.cli(
            0,
            &["bucket", "allow", "--read", &self.bucket, "--key", &id],
            t,
        )?;
        Ok((id, secret))
    }

    /// Kills node `i` (SIGKILL) and reaps it; a no-op if it is already gone.
    pub fn kill_node(&mut self, i: usize) {
        assert!(i < NODES, "garage node {i} does not exist (0..{NODES})");
        if let Some(mut child) = self.children.get_mut()[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of every node's log, for error messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for (i, log) in self.logs.iter().enumerate() {
            out.push_str(&format!(
                "\n--- garage node {i} ({}), last {LOG_TAIL_LINES} lines ---\n",
                log.display()
            ));
            match fs::read(log) {
                Ok(bytes) => {
                    let text = strip_ansi(&String::from_utf8_lossy(&bytes));
                    let lines: Vec<&str> = text.lines().collect();
                    for l in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("(cannot read: {e})\n")),
            }
        }
        out
    }

    fn fail(&self, msg: &str) -> String {
        format!("garage cluster: {msg}{}", self.log_tails())
    }

    /// Writes node `i`'s config and starts `garage server` for it.
    fn launch(&mut self, i: usize) -> Result<(), String> {
        self.kill_node(i);
        let node_dir = self.dir.path().join(format!("node-{i}"));
        let meta = node_dir.join("meta");
        let data = node_dir.join("data");
        if meta.exists() {
            // A previous attempt with another db engine.
            fs::remove_dir_all(&meta).map_err(|e| format!("clearing {}: {e}", meta.display()))?;
        }
        for d in [&meta, &data] {
            fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let config = format!(
            "metadata_dir = {meta}\n\
             data_dir = {data}\n\
             db_engine = \"{engine}\"\n\
             replication_factor = {NODES}\n\
             consistency_mode = \"consistent\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n",
            meta = toml_path(&meta)?,
            data = toml_path(&data)?,
            engine = self.engines[i],
            rpc = self.rpc_ports[i],
            secret = self.rpc_secret,
            s3 = self.s3_ports[i],
        );
        let cfg = &self.configs[i];
        fs::write(cfg, config).map_err(|e| format!("writing {}: {e}", cfg.display()))?;
        // Garage refuses a world-readable file holding the rpc secret.
        fs::set_permissions(cfg, fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod 600 {}: {e}", cfg.display()))?;

        let log_path = &self.logs[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(cfg)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        scrub_env(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            format!(
                "starting `{} -c {} server`: {e}",
                self.bin.display(),
                cfg.display()
            )
        })?;
        self.children.get_mut()[i] = Some(child);
        Ok(())
    }

    /// Polls node `i` until it answers RPC; returns its full node ID.
    fn wait_node_ready(&self, i: usize, deadline: Instant) -> Result<String, NodeWait> {
        let mut id: Option<String> = None;
        let mut last = String::from("not tried yet");
        loop {
            if let Some(why) = self.exited(i) {
                return Err(NodeWait::Exited(why));
            }
            let timeout = self.cli_timeout(deadline);
            if id.is_none() {
                match self.cli(i, &["node", "id"], timeout) {
                    Ok(out) => match parse_node_id(&out) {
                        Some(found) => id = Some(found),
                        None => last = format!("no node ID in `garage node id` output: {out}"),
                    },
                    Err(e) => last = e,
                }
            }
            // `node id` may be answered from disk; `status` needs the daemon.
            if let Some(found) = &id {
                match self.cli(i, &["status"], timeout) {
                    Ok(_) => return Ok(found.clone()),
                    Err(e) => last = e,
                }
            }
            if Instant::now() + POLL >= deadline {
                return Err(NodeWait::Timeout(format!(
                    "node {i} did not come up in time; last error: {last}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls node 0's `status` until it lists every node as healthy.
    fn wait_healthy(&self, deadline: Instant) -> Result<(), String> {
        let mut last;
        loop {
            self.check_alive()?;
            match self.cli(0, &["status"], self.cli_timeout(deadline)) {
                Ok(out) => {
                    // Healthy nodes come first; failed ones follow a header.
                    let healthy = out.split("FAILED NODES").next().unwrap_or("");
                    let missing: Vec<usize> = (0..NODES)
                        .filter(|&i| !healthy.contains(&self.node_ids[i][..16]))
                        .collect();
                    if missing.is_empty() {
                        return Ok(());
                    }
                    last = format!("nodes {missing:?} not healthy yet:\n{out}");
                }
                Err(e) => last = e,
            }
            if Instant::now() + POLL >= deadline {
                return Err(self.fail(&format!(
                    "nodes did not all become healthy in time; last: {last}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls until a PUT on node 0 reads back through every node's S3 API.
    fn wait_s3(&self, deadline: Instant) -> Result<(), String> {
        let endpoints: Vec<String> = (0..NODES).map(|i| self.endpoint(i)).collect();
        let bucket = self.bucket.clone();
        let key_id = self.key_id.clone();
        let secret = self.secret.clone();
        // A thread of its own: the caller may be inside a tokio runtime.
        let probe = std::thread::spawn(move || -> Result<(), String> {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("building a tokio runtime: {e}"))?;
            let mut last;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = left.clamp(Duration::from_millis(500), Duration::from_secs(5));
                match rt.block_on(s3_round_trip(
                    &endpoints, &bucket, &key_id, &secret, timeout,
                )) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
                if Instant::now() + POLL >= deadline {
                    return Err(format!(
                        "S3 PUT/GET did not work in time; last error: {last}"
                    ));
                }
                std::thread::sleep(POLL);
            }
        });
        probe
            .join()
            .map_err(|_| self.fail("the S3 readiness probe panicked"))?
            .map_err(|e| self.fail(&e))
    }

    /// The exit status of node `i` if it is no longer running.
    fn exited(&self, i: usize) -> Option<String> {
        let mut children = self.children.borrow_mut();
        let child = children[i].as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("node {i} exited ({status})")),
            Ok(None) => None,
            Err(e) => Some(format!("node {i}: cannot poll its process: {e}")),
        }
    }

    /// Errors (with logs) if a node that should be running has exited.
    fn check_alive(&self) -> Result<(), String> {
        for i in 0..NODES {
            if let Some(why) = self.exited(i) {
                return Err(self.fail(&format!("{why} during setup")));
            }
        }
        Ok(())
    }

    fn cli_timeout(&self, deadline: Instant) -> Duration {
        deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_secs(1), CLI_TIMEOUT)
    }

    /// Runs `garage -c <node i's config> ARGS`, killed after `timeout`.
    /// Ok(stdout) on success; Err(context + stderr + stdout) otherwise.
    fn cli(&self, node: usize, args: &[&str], timeout: Duration) -> Result<String, String> {
        let n = self.cli_runs.get() + 1;
        self.cli_runs.set(n);
        let out_path = self.dir.path().join(format!("cli-{n}.out"));
        let err_path = self.dir.path().join(format!("cli-{n}.err"));
        let what = format!("`garage {}` on node {node}", args.join(" "));
        let out = File::create(&out_path)
            .map_err(|e| format!("{what}: creating {}: {e}", out_path.display()))?;
        let err = File::create(&err_path)
            .map_err(|e| format!("{what}: creating {}: {e}", err_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&self.configs[node])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        scrub_env(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{what}: cannot run: {e}"))?;
        let until = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= until => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{what}: no answer within {timeout:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("{what}: waiting for it: {e}")),
            }
        };
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        if status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{what} failed ({status}): {}{}",
                strip_ansi(stderr.trim()),
                if stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!("\nstdout: {}", strip_ansi(stdout.trim()))
                }
            ))
        }
    }

    fn cli_retry(
        &self,
        node: usize,
        args: &[&str],
        deadline: Instant,
        what: &str,
    ) -> Result<String, String> {
        self.cli_retry_until(node, args, deadline, what, |_| false)
    }

    /// Retries a CLI command until it succeeds, `ok_error` accepts its
    /// error, or the deadline passes.
    fn cli_retry_until(
        &self,
        node: usize,
        args: &[&str],
        deadline: Instant,
        what: &str,
        ok_error: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let mut tries = 0;
        loop {
            self.check_alive()?;
            tries += 1;
            let last = match self.cli(node, args, self.cli_timeout(deadline)) {
                Ok(out) => return Ok(out),
                Err(e) if tries > 1 && ok_error(&e) => return Ok(String::new()),
                Err(e) => e,
            };
            if Instant::now() + POLL >= deadline {
                return Err(self.fail(&format!(
                    "{what}: gave up after {tries} tries; last error: {last}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("garage cluster logs at panic:{}", self.log_tails());
        }
        for i in 0..NODES {
            self.kill_node(i);
        }
        if std::env::var_os("WHARF_GARAGE_KEEP").is_some_and(|v| !v.is_empty()) {
            self.dir.disable_cleanup(true);
            eprintln!(
                "WHARF_GARAGE_KEEP: garage cluster files kept in {}",
                self.dir.path().display()
            );
        }
    }
}

enum NodeWait {
    Exited(String),
    Timeout(String),
}

impl NodeWait {
    fn message(&self) -> String {
        match self {
            NodeWait::Exited(m) | NodeWait::Timeout(m) => m.clone(),
        }
    }
}

/// One readiness attempt: PUT via node 0, GET via every node, DELETE.
async fn s3_round_trip(
    endpoints: &[String],
    bucket: &str,
    key_id: &str,
    secret: &str,
    timeout: Duration,
) -> Result<(), String> {
    let body = format!("ready {}", hex::encode(rand::random::<[u8; 8]>()));
    let path = ObjPath::from(READY_OBJECT);
    let mut stores = Vec::new();
    for ep in endpoints {
        let store = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(ep)
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            .with_region(REGION)
            // Client options carry allow_http too: set it on them, since
            // `with_client_options` replaces the builder's.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout),
            )
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: timeout,
                ..Default::default()
            })
            .build()
            .map_err(|e| format!("building an S3 client for {ep}: {e}"))?;
        stores.push(store);
    }
    stores[0]
        .put(&path, PutPayload::from(body.clone().into_bytes()))
        .await
        .map_err(|e| format!("PUT via {}: {}", endpoints[0], chain(&e)))?;
    for (store, ep) in stores.iter().zip(endpoints) {
        let got = store
            .get(&path)
            .await
            .map_err(|e| format!("GET via {ep}: {}", chain(&e)))?
            .bytes()
            .await
            .map_err(|e| format!("GET body via {ep}: {}", chain(&e)))?;
        if got.as_ref() != body.as_bytes() {
            return Err(format!(
                "GET via {ep} returned {:?}, not {body:?}",
                String::from_utf8_lossy(&got)
            ));
        }
    }
    stores[0]
        .delete(&path)
        .await
        .map_err(|e| format!("DELETE via {}: {}", endpoints[0], chain(&e)))
}

/// An error with its chain of sources, for messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

/// `n` distinct free loopback ports (all bound at once, then released).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("binding 127.0.0.1:0 to find a free port: {e}"))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| format!("reading a bound port: {e}"))
        })
        .collect()
}

/// Keeps the caller's GARAGE_* settings (config file, RPC host, secret,
/// tokens) from steering the test cluster, and keeps logs free of colour.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("NO_COLOR", "1");
}

fn toml_path(p: &Path) -> Result<String, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))?;
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// The 64-hex-digit node ID from `garage node id` (`ID@ADDR`).
fn parse_node_id(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let id = l.trim().split('@').next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

/// `Key ID:` and `Secret key:` from `garage key create` / `key info`.
fn parse_key(out: &str) -> Option<(String, String)> {
    let field = |name: &str| {
        out.lines().find_map(|l| {
            let v = l.trim().strip_prefix(name)?.trim();
            (!v.is_empty()).then(|| v.to_string())
        })
    };
    Some((field("Key ID:")?, field("Secret key:")?))
}

/// Drops ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A started cluster, or None (with a SKIPPED line on stderr) where no
/// garage binary is found. With WHARF_REQUIRE_GARAGE=1 (as CI sets it) a
/// missing binary fails the test instead: a skip there would hide that the
/// object-store tests never ran.
pub fn cluster_or_skip(test: &str, bucket: &str) -> Option<GarageCluster> {
    let Some(bin) = GarageCluster::binary() else {
        if std::env::var("WHARF_REQUIRE_GARAGE").is_ok_and(|v| v == "1") {
            panic!("{test}: WHARF_REQUIRE_GARAGE=1 but no garage binary (set WHARF_GARAGE_BIN or put garage on PATH)");
        }
        eprintln!("SKIPPED {test}: no garage binary (set WHARF_GARAGE_BIN or put garage on PATH)");
        return None;
    };
    match GarageCluster::start(&bin, bucket) {
        Ok(c) => Some(c),
        Err(e) => panic!("{test}: starting a 3-node garage cluster failed: {e}"),
    }
}
