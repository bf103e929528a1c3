//! The compose target: the repository's `docker-compose.yml` (a main and
//! two branches, each one container with PostgreSQL and the daemon), in a
//! compose project of its own. Faults are real: a cut link is `docker
//! network disconnect`, a crashed site is `docker kill`.
//!
//! SQL goes through `docker exec … psql` and status through `docker exec …
//! branchsync status --json`, so both work while a site is cut off from
//! every network. Works with compose v2 (`docker compose`) and Debian's
//! docker-compose 1.29.
//!
//! Nothing outlives the target: `teardown` (or drop, on Ctrl-C) runs
//! `down -v`, which removes the project's containers, network and volumes —
//! and only the project's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{ScenarioError, Scenario};

/// Compose project of scenario runs (override: BRANCHSYNC_COMPOSE_PROJECT).
const PROJECT: &str = "branchsync-scenario";
/// The services, in site order.
const SERVICES: [&str; 3] = ["main", "branch1", "branch2"];
/// The image the stack runs.
const IMAGE: &str = "branchsync:local";
/// The erp profile's Tryton servers, in site order, and their image.
const TRYTON_SERVICES: [&str; 3] = ["tryton-main", "tryton-branch1", "tryton-branch2"];
const TRYTON_IMAGE: &str = "branchsync-tryton:local";
/// psql's field, record and NULL markers (not in the scenarios' data).
const FS: char = '\u{1f}';
const RS: char = '\u{1e}';
const NULL: &str = "\u{1d}";

/// The compose stack, up.
pub struct ComposeTarget {
    compose: Vec<String>,
    file: PathBuf,
    project: String,
    env: Vec<(String, String)>,
    cids: Vec<String>,
    /// The erp profile's Tryton containers, in site order (empty without).
    tryton: Vec<String>,
    /// `--profile erp` when the scenario runs an ERP.
    profiles: Vec<String>,
    network: String,
    down: bool,
}

async fn output(program: &str, args: &[&str], env: &[(String, String)]) -> Result<std::process::Output, String> {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().await.map_err(|e| format!("cannot run {program}: {e}"))
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).trim().to_string()
}

/// The compose file: the given one, else `docker-compose.yml` in the
/// current directory or a parent.
fn find_compose_file(given: Option<&Path>) -> Result<PathBuf, ScenarioError> {
    if let Some(p) = given {
        return if p.exists() { Ok(p.to_path_buf()) } else { Err(ScenarioError::Setup(format!("compose file {} does not exist", p.display()))) };
    }
    let mut dir = std::env::current_dir().map_err(|e| ScenarioError::Setup(format!("cannot read the current directory: {e}")))?;
    loop {
        let f = dir.join("docker-compose.yml");
        if f.exists() {
            return Ok(f);
        }
        if !dir.pop() {
            return Err(ScenarioError::Setup(
                "no docker-compose.yml in the current directory or its parents\nHINT: Run from the branchsync repository, or pass --compose-file.".into(),
            ));
        }
    }
}

impl ComposeTarget {
    /// Brings the stack up in its own project (removing leftovers of an
    /// interrupted earlier run first) and waits until every site is healthy.
    pub async fn setup(sc: &Scenario, file: Option<&Path>, progress: &(dyn Fn(String) + Sync)) -> Result<ComposeTarget, ScenarioError> {
        if sc.branches != 2 {
            return Err(ScenarioError::Setup(format!("the compose stack has a main and two branches; scenario {} needs {} branch(es)\nHINT: Run it with --target local.", sc.name, sc.branches)));
        }
        let file = find_compose_file(file)?;
        let info = output("docker", &["info", "--format", "{{.ServerVersion}}"], &[]).await.map_err(ScenarioError::Setup)?;
        if !info.status.success() {
            return Err(ScenarioError::Setup(format!("cannot reach the Docker engine\nDETAIL: {}\nHINT: Start Docker, and run as root or as a member of the docker group.", text(&info))));
        }
        let compose: Vec<String> = if output("docker", &["compose", "version"], &[]).await.is_ok_and(|o| o.status.success()) {
            vec!["docker".into(), "compose".into()]
        } else if output("docker-compose", &["version"], &[]).await.is_ok_and(|o| o.status.success()) {
            vec!["docker-compose".into()]
        } else {
            return Err(ScenarioError::Setup("neither `docker compose` nor `docker-compose` is installed\nHINT: Install Docker Compose (Debian: apt-get install docker-compose).".into()));
        };
        let img = output("docker", &["image", "inspect", IMAGE], &[]).await.map_err(ScenarioError::Setup)?;
        if !img.status.success() {
            return Err(ScenarioError::Setup(format!("the image {IMAGE} does not exist\nHINT: Build it with docker/build.sh (no registry needed).")));
        }
        let erp = sc.erp.is_some();
        if erp {
            let img = output("docker", &["image", "inspect", TRYTON_IMAGE], &[]).await.map_err(ScenarioError::Setup)?;
            if !img.status.success() {
                return Err(ScenarioError::Setup(format!("scenario {} runs Tryton, and the image {TRYTON_IMAGE} does not exist\nHINT: Build it with docker/build.sh --erp (no registry needed).", sc.name)));
            }
        }
        let project = std::env::var("BRANCHSYNC_COMPOSE_PROJECT").unwrap_or_else(|_| PROJECT.into());
        // Free published ports: a demo stack on the default ports may run.
        let mut env: Vec<(String, String)> = ["MAIN_SYNC_PORT", "MAIN_HTTP_PORT", "MAIN_PG_PORT", "BRANCH1_HTTP_PORT", "BRANCH1_PG_PORT", "BRANCH2_HTTP_PORT", "BRANCH2_PG_PORT", "TRYTON_MAIN_PORT", "TRYTON_BRANCH1_PORT", "TRYTON_BRANCH2_PORT"]
            .iter()
            .map(|k| (k.to_string(), branchsync_engine::cluster::free_port().to_string()))
            .collect();
        env.extend([("BRANCHSYNC_HEARTBEAT_MS", "500"), ("BRANCHSYNC_PEER_TIMEOUT_MS", "3000"), ("BRANCHSYNC_RECONNECT_MAX_MS", "1000")].map(|(k, v)| (k.to_string(), v.to_string())));
        // The sites' ERP preset where the scenario runs an ERP; otherwise the
        // stack's own default (the Tryton preset, which names only Tryton's
        // tables: the point-of-sale scenarios run as `docker-compose up` does).
        if let Some(erp) = &sc.erp {
            env.push(("BRANCHSYNC_PRESET".into(), erp.clone()));
        }
        let profiles = if erp { vec!["--profile".to_string(), "erp".to_string()] } else { Vec::new() };
        let mut t = ComposeTarget { compose, file, project, env, cids: Vec::new(), tryton: Vec::new(), profiles, network: String::new(), down: false };
        progress(format!("{} -p {} up -d ({})", t.compose.join(" "), t.project, t.file.display()));
        // Leftovers of an interrupted run of this project.
        let _ = t.compose_cmd(&["down", "-v", "--remove-orphans"]).await;
        let up = t.compose_cmd(&["up", "-d"]).await.map_err(ScenarioError::Setup)?;
        if !up.status.success() {
            return Err(ScenarioError::Setup(format!("compose up failed:\n{}", text(&up))));
        }
        for s in SERVICES {
            let id = t.container_of(s).await?;
            t.cids.push(id);
        }
        if erp {
            for s in TRYTON_SERVICES {
                let id = t.container_of(s).await?;
                t.tryton.push(id);
            }
        }
        let o = output("docker", &["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", &t.cids[1]], &[]).await.map_err(ScenarioError::Setup)?;
        t.network = String::from_utf8_lossy(&o.stdout).split_whitespace().find(|n| n.ends_with("_shops")).unwrap_or_default().to_string();
        if t.network.is_empty() {
            return Err(ScenarioError::Setup(format!("branch1 is not on a *_shops network ({})", text(&o))));
        }
        progress("waiting until main, branch1 and branch2 are healthy (PostgreSQL up, schema loaded, branchsync init done, daemon answering)".into());
        for i in 0..SERVICES.len() {
            t.wait_healthy(i, Duration::from_secs(sc.timeout_s.max(180))).await.map_err(|e| ScenarioError::Setup(e.to_string()))?;
        }
        if erp {
            progress("waiting until the three Tryton servers answer: the head office's installs Tryton and seeds it, branchsync carries schema and rows to the shops, each shop sets its numbering (a few minutes)".into());
            for i in 0..TRYTON_SERVICES.len() {
                t.wait_tryton(i, Duration::from_secs(1200), progress).await.map_err(|e| ScenarioError::Setup(e.to_string()))?;
            }
        }
        Ok(t)
    }

    async fn container_of(&self, service: &str) -> Result<String, ScenarioError> {
        let o = self.compose_cmd(&["ps", "-q", service]).await.map_err(ScenarioError::Setup)?;
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if id.is_empty() {
            return Err(ScenarioError::Setup(format!("compose started no container for service {service}\n{}", text(&o))));
        }
        Ok(id)
    }

    /// Waits until site `i`'s Tryton server is healthy, saying every 30 s
    /// what its container last printed.
    async fn wait_tryton(&self, i: usize, limit: Duration, progress: &(dyn Fn(String) + Sync)) -> Result<(), ScenarioError> {
        let t = Instant::now();
        let mut said = Instant::now();
        loop {
            let o = output("docker", &["inspect", "-f", "{{.RestartCount}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", &self.tryton[i]], &[]).await.map_err(|e| self.site_err(i, e))?;
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let (restarts, st) = out.split_once(' ').map(|(n, st)| (n.parse::<u32>().unwrap_or(0), st.to_string())).unwrap_or((0, out.clone()));
            if st == "running healthy" {
                progress(format!("{} answers ({:.0} s)", TRYTON_SERVICES[i], t.elapsed().as_secs_f64()));
                return Ok(());
            }
            let tail = || async { output("docker", &["logs", "--tail", "15", &self.tryton[i]], &[]).await.map(|o| text(&o)).unwrap_or_else(|e| e) };
            // Its setup failed (the restart policy starts it again): twice
            // is not chance.
            if restarts >= 2 {
                return Err(ScenarioError::Site { site: TRYTON_SERVICES[i].into(), message: format!("its setup failed {restarts} times; last lines:\n{}", tail().await) });
            }
            if st.starts_with("exited") || t.elapsed() > limit {
                return Err(ScenarioError::Timeout { what: format!("{} is healthy", TRYTON_SERVICES[i]), secs: limit.as_secs(), detail: format!("container state: {st}\n{}", tail().await) });
            }
            if said.elapsed() >= Duration::from_secs(30) {
                let last = tail().await;
                progress(format!("{}: {st}; last said: {}", TRYTON_SERVICES[i], last.lines().last().unwrap_or("")));
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// `n` sales through site `i`'s Tryton server, dated `date`; per sale
    /// its receipt and move numbers.
    pub async fn tryton_sell(&mut self, i: usize, n: u32, date: Option<&str>) -> Result<Vec<(String, String)>, ScenarioError> {
        let n = n.to_string();
        let mut args = vec!["exec", self.tryton[i].as_str(), "tryton-site", "sell", n.as_str()];
        if let Some(d) = date {
            args.push(d);
        }
        let o = output("docker", &args, &[]).await.map_err(|e| self.site_err(i, e))?;
        if !o.status.success() {
            return Err(self.site_err(i, format!("selling through Tryton failed:\n{}", text(&o))));
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("sale ")?.split(' ');
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect())
    }

    /// `branchsync verify` in site `i`'s container: whether it agrees, and
    /// what it said.
    pub async fn verify(&mut self, i: usize) -> Result<(bool, String), ScenarioError> {
        let o = output("docker", &["exec", &self.cids[i], "branchsync", "verify"], &[]).await.map_err(|e| self.site_err(i, e))?;
        // Its verdict is on stdout; stderr holds its progress log lines.
        Ok((o.status.success(), if o.status.success() { String::from_utf8_lossy(&o.stdout).trim().to_string() } else { text(&o) }))
    }

    /// `branchsync preset show NAME` of the image's binary: the rules the
    /// sites run with.
    pub async fn preset(&self, name: &str) -> Result<String, ScenarioError> {
        let o = output("docker", &["exec", &self.cids[0], "branchsync", "preset", "show", name], &[]).await.map_err(|e| self.site_err(0, e))?;
        if !o.status.success() {
            return Err(self.site_err(0, format!("branchsync preset show {name} failed: {}", text(&o))));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    async fn compose_cmd(&self, args: &[&str]) -> Result<std::process::Output, String> {
        let file = self.file.display().to_string();
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(["-f", &file, "-p", &self.project]);
        all.extend(self.profiles.iter().map(String::as_str));
        all.extend(args);
        output(&self.compose[0], &all, &self.env).await
    }

    /// One line on what runs where.
    pub fn describe(&self) -> String {
        format!("compose: project {} from {} ({}), network {}", self.project, self.file.display(), self.compose.join(" "), self.network)
    }

    fn site_err(&self, i: usize, message: String) -> ScenarioError {
        ScenarioError::Site { site: SERVICES[i].into(), message }
    }

    async fn wait_healthy(&self, i: usize, limit: Duration) -> Result<(), ScenarioError> {
        let t = Instant::now();
        loop {
            let o = output("docker", &["inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", &self.cids[i]], &[]).await.map_err(|e| self.site_err(i, e))?;
            let st = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if st == "running healthy" {
                return Ok(());
            }
            if t.elapsed() > limit {
                return Err(ScenarioError::Timeout { what: format!("{} is healthy", SERVICES[i]), secs: limit.as_secs(), detail: format!("container state: {st}\n{}", self.log_tail(i, 15).await) });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn psql(&self, i: usize, args: &[&str], stdin: Option<&str>) -> Result<String, ScenarioError> {
        let mut c = Command::new("docker");
        c.args(["exec", "-i", &self.cids[i], "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "erp"]).args(args).kill_on_drop(true);
        c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.site_err(i, format!("cannot run docker exec: {e}")))?;
        if let (Some(sql), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(sql.as_bytes()).await.map_err(|e| self.site_err(i, format!("cannot send SQL to psql: {e}")))?;
        }
        let o = child.wait_with_output().await.map_err(|e| self.site_err(i, format!("docker exec psql: {e}")))?;
        if !o.status.success() {
            return Err(self.site_err(i, String::from_utf8_lossy(&o.stderr).trim().trim_start_matches("psql:<stdin>:").to_string()));
        }
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    }

    /// Runs SQL at site `i` (psql reading it from stdin).
    pub async fn exec(&mut self, i: usize, sql: &str) -> Result<(), ScenarioError> {
        self.psql(i, &[], Some(sql)).await.map(|_| ())
    }

    /// Rows of one query at site `i`, every value as text.
    pub async fn query(&mut self, i: usize, sql: &str) -> Result<Vec<Vec<Option<String>>>, ScenarioError> {
        let (fs, rs) = (FS.to_string(), RS.to_string());
        let out = self.psql(i, &["-A", "-t", "-F", &fs, "-R", &rs, "-P", &format!("null={NULL}"), "-c", sql], None).await?;
        Ok(out
            .trim_end_matches('\n')
            .split(RS)
            .filter(|r| !r.is_empty())
            .map(|r| r.split(FS).map(|v| (v != NULL).then(|| v.to_string())).collect())
            .collect())
    }

    /// `branchsync status --json` inside site `i`'s container.
    pub async fn status(&self, i: usize) -> Option<serde_json::Value> {
        let o = output("docker", &["exec", &self.cids[i], "branchsync", "status", "--json"], &[]).await.ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }

    /// `docker network disconnect` of branch `i`.
    pub async fn cut(&mut self, i: usize) -> Result<(), ScenarioError> {
        self.docker(i, &["network", "disconnect", &self.network.clone(), &self.cids[i].clone()]).await
    }

    /// `docker network connect` of branch `i`, under its service name.
    pub async fn restore(&mut self, i: usize) -> Result<(), ScenarioError> {
        self.docker(i, &["network", "connect", "--alias", SERVICES[i], &self.network.clone(), &self.cids[i].clone()]).await
    }

    async fn docker(&self, i: usize, args: &[&str]) -> Result<(), ScenarioError> {
        let o = output("docker", args, &[]).await.map_err(|e| self.site_err(i, e))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(self.site_err(i, format!("docker {} failed: {}", args.join(" "), text(&o))))
        }
    }

    /// `kill -9` of the daemon in site `i`'s container. The container's
    /// entrypoint treats that as the site's failure: it stops PostgreSQL and
    /// exits, and the restart policy starts the site again.
    pub async fn kill_daemon(&mut self, i: usize) -> Result<(), ScenarioError> {
        self.docker(i, &["exec", &self.cids[i].clone(), "sh", "-c", "kill -9 \"$(cat /run/branchsync/daemon.pid)\""]).await
    }

    /// Waits until site `i` is healthy again (its restart policy restarted it).
    pub async fn start_daemon(&mut self, i: usize) -> Result<(), ScenarioError> {
        // The container may not have noticed the kill yet.
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.wait_healthy(i, Duration::from_secs(180)).await
    }

    /// `docker kill` of site `i`: PostgreSQL and daemon die at once, as in a
    /// power cut.
    pub async fn crash_postgres(&mut self, i: usize) -> Result<(), ScenarioError> {
        self.docker(i, &["kill", "--signal", "KILL", &self.cids[i].clone()]).await
    }

    /// `docker start` of site `i`, then waits until it is healthy.
    pub async fn start_postgres(&mut self, i: usize) -> Result<(), ScenarioError> {
        self.docker(i, &["start", &self.cids[i].clone()]).await?;
        self.wait_healthy(i, Duration::from_secs(180)).await
    }

    /// The last `n` lines of site `i`'s container log.
    pub async fn log_tail(&self, i: usize, n: usize) -> String {
        match output("docker", &["logs", "--tail", &n.to_string(), &self.cids[i]], &[]).await {
            Ok(o) => text(&o),
            Err(e) => e,
        }
    }

    /// `down -v`: the project's containers, network and volumes go.
    pub async fn teardown(mut self) {
        let _ = self.compose_cmd(&["down", "-v", "--remove-orphans"]).await;
        self.down = true;
    }
}

impl Drop for ComposeTarget {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        // Interrupted: remove the stack before the program exits.
        let file = self.file.display().to_string();
        let mut c = std::process::Command::new(&self.compose[0]);
        c.args(&self.compose[1..]).args(["-f", &file, "-p", &self.project]).args(&self.profiles).args(["down", "-v", "--remove-orphans"]).stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let _ = c.status();
    }
}
