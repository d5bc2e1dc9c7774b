//! Docker side-cars of vz-kubelet pods (containers 1..N; container 0 is the VM), over
//! [bollard]. This crate knows nothing of VMs: it turns a Kubernetes container into a
//! Docker container and back into a container state, and serves its streams.
//!
//! # Contract
//! * [`SidecarRuntime::connect`] talks to the local dockerd (`DOCKER_HOST` or
//!   `/var/run/docker.sock`), negotiates the API version down to the daemon's, and fails
//!   with [`DockerError::Unreachable`] when there is none — the caller then runs VM-only
//!   pods and reports side-cars as waiting.
//! * Every container it creates carries the labels of [`spec`] (`vz-kubelet.io/pod-uid`,
//!   `namespace`, `pod`, `container`, `node`, `attempt`) and is named
//!   `vzk_<ns>_<pod>_<container>_<uid8>_<attempt>`. [`SidecarRuntime::list_ours`] and
//!   [`SidecarRuntime::cleanup`] only ever look at containers labelled with this
//!   runtime's node name: a container without our labels is never touched (the Go
//!   reference force-removes by name prefix).
//! * Docker's restart policy is `no`; restarts are the caller's (per pod `restartPolicy`),
//!   each restart a new container (`attempt` + 1), so the previous one keeps its logs.
//! * Networking: side-cars run on Docker's default bridge, in a network namespace of
//!   their own — they do not share the VM's. Port-forward enters the side-car's network
//!   namespace and connects to `127.0.0.1:<port>` there, as the kubelet does for a pod
//!   (so ports bound to the container's loopback are reachable too).
//! * Exec keeps the process's exit code (the reference loses it): the exec is inspected
//!   after its output ends.

pub mod error;
pub mod logs;
pub mod spec;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ExecConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    ResizeContainerTTYOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use chrono::Utc;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, info, warn};
use vzk_core::PodKey;
use vzk_core::stats::{ContainerStats, CpuStats, MemoryStats};
use vzk_core::streams::{AttachIo, ExitStatus, LogOptions, LogStream, PortStream};

pub use error::{DockerError, error_chain};
pub use spec::{Bind, ImageRef, PullPolicy, SidecarSpec, container_name};

/// Registry credentials for a pull (the caller resolves pull secrets and the node's
/// docker config and passes what matches the image's registry, in order).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// OAuth2 identity (refresh) token, used instead of the password when set.
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What [`SidecarRuntime::ensure_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullOutcome {
    /// The image was present and the policy did not ask for a pull.
    AlreadyPresent,
    /// The image was pulled (or confirmed current) from its registry.
    Pulled {
        /// How long the pull took.
        elapsed: Duration,
    },
}

/// One of our containers, as listed by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedContainer {
    /// Docker id.
    pub id: String,
    /// Docker name (without the leading `/`).
    pub name: String,
    /// Pod UID label.
    pub pod_uid: String,
    /// Pod namespace label.
    pub namespace: String,
    /// Pod name label.
    pub pod: String,
    /// Container name label.
    pub container: String,
    /// Attempt label (0 when missing or unparsable).
    pub attempt: u32,
    /// Whether it runs.
    pub running: bool,
}

/// A side-car's state from `docker inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarState {
    /// Docker id.
    pub id: String,
    /// The image id (`sha256:…`).
    pub image_id: String,
    /// Where the container is.
    pub status: RunState,
}

/// Created, running or ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// Created, never started.
    Created,
    /// Running since `started_at`.
    Running {
        /// When the process started.
        started_at: Option<Timestamp>,
    },
    /// Ended.
    Exited {
        /// Exit code (128 + signal for a signal).
        exit_code: i32,
        /// `Completed`, `Error` or `OOMKilled`.
        reason: String,
        /// Docker's error message, if any.
        message: Option<String>,
        /// When it started.
        started_at: Option<Timestamp>,
        /// When it ended.
        finished_at: Option<Timestamp>,
    },
}

impl SidecarState {
    /// The Kubernetes container state.
    pub fn to_k8s(&self) -> ContainerState {
        match &self.status {
            RunState::Created => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
            RunState::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: started_at.map(Time),
                }),
                ..Default::default()
            },
            RunState::Exited {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            } => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: started_at.map(Time),
                    finished_at: finished_at.map(Time),
                    container_id: Some(format!("docker://{}", self.id)),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    /// Whether the container runs.
    pub fn is_running(&self) -> bool {
        matches!(self.status, RunState::Running { .. })
    }
}

fn docker_time(s: Option<&str>) -> Option<Timestamp> {
    let s = s?;
    // Docker reports "0001-01-01T00:00:00Z" for "never".
    if s.starts_with("0001-") {
        return None;
    }
    s.parse::<Timestamp>().ok()
}

impl SidecarState {
    fn from_inspect(r: &ContainerInspectResponse) -> Self {
        let st = r.state.clone().unwrap_or_default();
        let started_at = docker_time(st.started_at.as_deref());
        let status = match st.status {
            Some(ContainerStateStatusEnum::RUNNING)
            | Some(ContainerStateStatusEnum::PAUSED)
            | Some(ContainerStateStatusEnum::RESTARTING) => RunState::Running { started_at },
            Some(ContainerStateStatusEnum::CREATED)
            | None
            | Some(ContainerStateStatusEnum::EMPTY)
                if started_at.is_none() =>
            {
                RunState::Created
            }
            _ => {
                let exit_code = i32::try_from(st.exit_code.unwrap_or(0)).unwrap_or(255);
                let oom = st.oom_killed.unwrap_or(false);
                let reason = if oom {
                    "OOMKilled"
                } else if exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                RunState::Exited {
                    exit_code,
                    reason: reason.into(),
                    message: st.error.filter(|e| !e.is_empty()),
                    started_at,
                    // Docker stamps start and finish in different components: a process that
                    // exits at once can "finish" microseconds before it "started".
                    finished_at: docker_time(st.finished_at.as_deref())
                        .map(|f| started_at.map_or(f, |s| f.max(s))),
                }
            }
        };
        SidecarState {
            id: r.id.clone().unwrap_or_default(),
            image_id: r.image.clone().unwrap_or_default(),
            status,
        }
    }
}

/// The side-car runtime of one node.
pub struct SidecarRuntime {
    docker: Docker,
    node: String,
    cpu_samples: Mutex<HashMap<String, (Instant, u64)>>,
}

impl std::fmt::Debug for SidecarRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarRuntime")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn write_all(w: &mut Option<vzk_core::streams::BoxWriter>, data: &[u8]) {
    if let Some(out) = w.as_mut()
        && (out.write_all(data).await.is_err() || out.flush().await.is_err())
    {
        // The client went away: stop writing to it, keep draining Docker.
        *w = None;
    }
}

impl SidecarRuntime {
    /// Connects to the local dockerd for node `node` (its name goes into every label).
    pub async fn connect(node: &str) -> Result<Self, DockerError> {
        let docker =
            Docker::connect_with_local_defaults().map_err(|e| DockerError::Unreachable {
                message: "connecting to the local Docker socket".into(),
                source: Some(e),
            })?;
        Self::with_docker(docker, node).await
    }

    /// Wraps an existing bollard client (e.g. `Docker::connect_with_unix`).
    pub async fn with_docker(docker: Docker, node: &str) -> Result<Self, DockerError> {
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| DockerError::Unreachable {
                message: "dockerd did not answer /version within 10 s".into(),
                source: None,
            })?
            .map_err(|e| DockerError::Unreachable {
                message: "asking dockerd for its version".into(),
                source: Some(e),
            })?;
        info!(node, api = %docker.client_version(), "connected to Docker");
        Ok(Self {
            docker,
            node: node.to_owned(),
            cpu_samples: Mutex::new(HashMap::new()),
        })
    }

    /// The bollard client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The node name in our labels.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether dockerd answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| DockerError::api("ping", "dockerd", e))
    }

    /// Whether `image` is present locally.
    pub async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match DockerError::api("inspect image", image, e) {
                DockerError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Makes `image` available per `policy`: `Never` only checks presence,
    /// `IfNotPresent` pulls when absent, `Always` asks the registry every time. Each
    /// credential is tried in order (anonymous when there is none).
    pub async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[RegistryAuth],
    ) -> Result<PullOutcome, DockerError> {
        let r = ImageRef::parse(image)?;
        let present = self.image_present(image).await?;
        match policy {
            PullPolicy::Never if present => return Ok(PullOutcome::AlreadyPresent),
            PullPolicy::Never => {
                return Err(DockerError::ImageNeverPull {
                    image: image.to_owned(),
                });
            }
            PullPolicy::IfNotPresent if present => return Ok(PullOutcome::AlreadyPresent),
            _ => {}
        }
        let (from_image, tag) = r.pull_args();
        let attempts: Vec<Option<DockerCredentials>> = if credentials.is_empty() {
            vec![None]
        } else {
            credentials
                .iter()
                .map(|c| {
                    Some(DockerCredentials {
                        username: Some(c.username.clone()).filter(|u| !u.is_empty()),
                        password: Some(c.password.clone()).filter(|p| !p.is_empty()),
                        identitytoken: c.identity_token.clone(),
                        serveraddress: Some(r.registry().to_owned()),
                        ..Default::default()
                    })
                })
                .collect()
        };
        let t0 = Instant::now();
        let mut last = String::new();
        for creds in attempts {
            let mut b = CreateImageOptionsBuilder::default().from_image(&from_image);
            if !tag.is_empty() {
                b = b.tag(&tag);
            }
            let mut stream = self.docker.create_image(Some(b.build()), None, creds);
            let mut failed = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(s) = info.status {
                            debug!(image, status = %s, "pull");
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    return Ok(PullOutcome::Pulled {
                        elapsed: t0.elapsed(),
                    });
                }
                Some(e) => {
                    let err = DockerError::api("pull", image, e);
                    if let DockerError::Unreachable { .. } = err {
                        return Err(err);
                    }
                    last = match &err {
                        DockerError::Api { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    warn!(image, error = %last, "pull attempt failed");
                }
            }
        }
        Err(DockerError::Pull {
            image: image.to_owned(),
            message: last,
        })
    }

    /// Creates (does not start) the container for `spec`. A leftover container with
    /// the same name (an agent that died between create and record) is removed first.
    pub async fn create(&self, spec: &SidecarSpec<'_>) -> Result<String, DockerError> {
        let body = spec::create_body(spec, &self.node)?;
        let name = container_name(spec.pod, &spec.container.name, spec.attempt);
        for round in 0..2 {
            let opts = CreateContainerOptionsBuilder::default().name(&name).build();
            match self.docker.create_container(Some(opts), body.clone()).await {
                Ok(r) => {
                    for w in r.warnings {
                        warn!(container = %name, warning = %w, "docker create");
                    }
                    return Ok(r.id);
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) if round == 0 => {
                    // Only a container of ours (this node's labels) is removed.
                    let theirs = self
                        .docker
                        .inspect_container(&name, None)
                        .await
                        .map_err(|e| DockerError::api("inspect", &name, e))?;
                    let node = theirs
                        .config
                        .and_then(|c| c.labels)
                        .and_then(|l| l.get(spec::LABEL_NODE).cloned());
                    if node.as_deref() != Some(self.node.as_str()) {
                        return Err(DockerError::InvalidSpec(format!(
                            "container name {name} is taken by a container that is not this node's"
                        )));
                    }
                    warn!(container = %name, "removing a leftover container with our name");
                    self.remove(&name).await?;
                }
                Err(e) => return Err(DockerError::api("create", &name, e)),
            }
        }
        Err(DockerError::InvalidSpec(format!(
            "container name {name} stays in use"
        )))
    }

    /// Starts a created container.
    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| DockerError::api("start", id, e))
    }

    /// The container's state.
    pub async fn inspect(&self, id: &str) -> Result<SidecarState, DockerError> {
        let r = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspect", id, e))?;
        Ok(SidecarState::from_inspect(&r))
    }

    /// Waits until the container is not running, then returns its state.
    pub async fn wait(&self, id: &str) -> Result<SidecarState, DockerError> {
        let opts = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut s = self.docker.wait_container(id, Some(opts));
        match s.next().await {
            // A non-zero exit comes back as an error from bollard: not a failure here.
            Some(Ok(_))
            | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. }))
            | None => self.inspect(id).await,
            Some(Err(e)) => {
                let err = DockerError::api("wait", id, e);
                if matches!(
                    err,
                    DockerError::NotFound(_) | DockerError::Unreachable { .. }
                ) {
                    return Err(err);
                }
                // Anything else: fall back to polling.
                warn!(container = id, error = %error_chain(&err), "docker wait failed; polling");
                loop {
                    let st = self.inspect(id).await?;
                    if !st.is_running() {
                        return Ok(st);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Stops the container: SIGTERM (or the image's stop signal), SIGKILL after
    /// `grace` (whole seconds, rounded up). Stopping a stopped container is fine.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let secs = i32::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0))
            .unwrap_or(i32::MAX);
        let opts = StopContainerOptionsBuilder::default().t(secs).build();
        match self.docker.stop_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api("stop", id, e)),
        }
    }

    /// Removes the container (forced, with its anonymous volumes). A missing one is fine.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        lock(&self.cpu_samples).remove(id);
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::api("remove", id, e) {
                DockerError::NotFound(_) => Ok(()),
                // 409 "removal already in progress".
                DockerError::Api {
                    source:
                        bollard::errors::Error::DockerResponseServerError {
                            status_code: 409, ..
                        },
                    ..
                } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Our containers on this node (running or not), optionally of one pod.
    pub async fn list_ours(
        &self,
        pod_uid: Option<&str>,
    ) -> Result<Vec<OwnedContainer>, DockerError> {
        let mut label = vec![format!("{}={}", spec::LABEL_NODE, self.node)];
        if let Some(uid) = pod_uid {
            label.push(format!("{}={uid}", spec::LABEL_POD_UID));
        }
        let filters = HashMap::from([("label".to_owned(), label)]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| DockerError::api("list", "containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // Double-check the labels (never trust a filter with deletion).
                if labels.get(spec::LABEL_NODE) != Some(&self.node) {
                    return None;
                }
                let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
                let pod_uid = get(spec::LABEL_POD_UID);
                if pod_uid.is_empty() {
                    return None;
                }
                Some(OwnedContainer {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_owned(),
                    namespace: get(spec::LABEL_NAMESPACE),
                    pod: get(spec::LABEL_POD),
                    container: get(spec::LABEL_CONTAINER),
                    attempt: get(spec::LABEL_ATTEMPT).parse().unwrap_or(0),
                    running: matches!(
                        c.state,
                        Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                    ),
                    pod_uid,
                })
            })
            .collect())
    }

    /// Removes our containers (this node's labels) whose pod UID `keep` rejects;
    /// returns the names removed. Containers without our labels are never touched.
    pub async fn cleanup(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, DockerError> {
        let mut removed = Vec::new();
        for c in self.list_ours(None).await? {
            if keep(&c.pod_uid) {
                continue;
            }
            info!(container = %c.name, pod_uid = %c.pod_uid, "removing a leftover side-car");
            self.remove(&c.id).await?;
            removed.push(c.name);
        }
        Ok(removed)
    }

    /// Runs `command` in the running container with `io`; returns the command's exit
    /// code. With a TTY, resize events resize the exec's terminal.
    pub async fn exec(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        self.exec_inner(id, command, io, false).await
    }

    /// Like [`Self::exec`], for probes: if the returned future is dropped before the
    /// process ends (the probe's timeout), the process is killed (`SIGKILL` to the host
    /// PID Docker reports for the exec), so a timed-out probe leaves nothing running.
    pub async fn exec_probe(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        self.exec_inner(id, command, io, true).await
    }

    async fn exec_inner(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
        kill_on_drop: bool,
    ) -> Result<ExitStatus, DockerError> {
        if command.is_empty() {
            return Err(DockerError::InvalidSpec("exec: empty command".into()));
        }
        let AttachIo {
            stdin,
            mut stdout,
            mut stderr,
            tty,
            resize,
        } = io;
        let config = ExecConfig {
            attach_stdin: Some(stdin.is_some()),
            attach_stdout: Some(stdout.is_some()),
            attach_stderr: Some(stderr.is_some() && !tty),
            tty: Some(tty),
            cmd: Some(command),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(id, config)
            .await
            .map_err(|e| DockerError::api("exec", id, e))?;
        let exec_id = created.id;
        let mut guard = kill_on_drop.then(|| KillExecOnDrop {
            docker: self.docker.clone(),
            exec_id: exec_id.clone(),
        });
        let started = self
            .docker
            .start_exec(
                &exec_id,
                Some(StartExecOptions {
                    detach: false,
                    tty,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| DockerError::api("exec start", id, e))?;
        let StartExecResults::Attached { mut output, input } = started else {
            return Err(DockerError::InvalidSpec("exec started detached".into()));
        };
        let stdin_task = stdin.map(|mut r| {
            let mut input = input;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut r, &mut input).await;
                let _ = input.shutdown().await;
            })
        });
        let resize_task = resize.filter(|_| tty).map(|mut rx| {
            let docker = self.docker.clone();
            let exec_id = exec_id.clone();
            tokio::spawn(async move {
                while let Some(sz) = rx.recv().await {
                    let opts = bollard::exec::ResizeExecOptions {
                        height: sz.height,
                        width: sz.width,
                    };
                    if let Err(e) = docker.resize_exec(&exec_id, opts).await {
                        debug!(error = %e, "exec resize");
                    }
                }
            })
        });
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdErr { message }) => {
                    if stderr.is_some() {
                        write_all(&mut stderr, &message).await;
                    } else {
                        write_all(&mut stdout, &message).await;
                    }
                }
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    write_all(&mut stdout, &message).await;
                }
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => {
                    debug!(error = %e, "exec output ended with an error");
                    break;
                }
            }
        }
        if let Some(t) = stdin_task {
            t.abort();
        }
        if let Some(t) = resize_task {
            t.abort();
        }
        for w in [&mut stdout, &mut stderr].into_iter().flatten() {
            let _ = w.shutdown().await;
        }
        // The output ends when the process does; Docker records the code just after.
        for _ in 0..100 {
            let r = self
                .docker
                .inspect_exec(&exec_id)
                .await
                .map_err(|e| DockerError::api("exec inspect", id, e))?;
            if r.running != Some(true) {
                if let Some(g) = guard.as_mut() {
                    g.exec_id.clear();
                }
                let code = r.exit_code.unwrap_or(0);
                return Ok(ExitStatus {
                    code: i32::try_from(code).unwrap_or(255),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(DockerError::InvalidSpec(format!(
            "exec in {id}: output ended but the process still runs"
        )))
    }

    /// Attaches to the container's main process. Returns its exit code when it ended
    /// while attached, `0` when the client detached (stdin closed) and it still runs.
    pub async fn attach(&self, id: &str, io: AttachIo) -> Result<ExitStatus, DockerError> {
        let AttachIo {
            stdin,
            mut stdout,
            mut stderr,
            tty,
            resize,
        } = io;
        let opts = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdin(stdin.is_some())
            .stdout(stdout.is_some())
            .stderr(stderr.is_some() || tty)
            .build();
        let st = self.inspect(id).await?;
        if !st.is_running() {
            return Err(DockerError::NotRunning(id.to_owned()));
        }
        let res = self
            .docker
            .attach_container(id, Some(opts))
            .await
            .map_err(|e| DockerError::api("attach", id, e))?;
        let mut output = res.output;
        let stdin_task = stdin.map(|mut r| {
            let mut input = res.input;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut r, &mut input).await;
                let _ = input.shutdown().await;
            })
        });
        let resize_task = resize.filter(|_| tty).map(|mut rx| {
            let docker = self.docker.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                while let Some(sz) = rx.recv().await {
                    let opts = ResizeContainerTTYOptionsBuilder::default()
                        .h(i32::from(sz.height))
                        .w(i32::from(sz.width))
                        .build();
                    if let Err(e) = docker.resize_container_tty(&id, opts).await {
                        debug!(error = %e, "attach resize");
                    }
                }
            })
        });
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdErr { message }) if stderr.is_some() => {
                    write_all(&mut stderr, &message).await;
                }
                Ok(
                    LogOutput::StdErr { message }
                    | LogOutput::StdOut { message }
                    | LogOutput::Console { message },
                ) => write_all(&mut stdout, &message).await,
                Ok(LogOutput::StdIn { .. }) => {}
                Err(_) => break,
            }
        }
        if let Some(t) = stdin_task {
            t.abort();
        }
        if let Some(t) = resize_task {
            t.abort();
        }
        for w in [&mut stdout, &mut stderr].into_iter().flatten() {
            let _ = w.shutdown().await;
        }
        // The attach ends with the process; give Docker a moment to record it.
        for _ in 0..20 {
            let st = self.inspect(id).await?;
            if let RunState::Exited { exit_code, .. } = st.status {
                return Ok(ExitStatus { code: exit_code });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ExitStatus::SUCCESS)
    }

    /// The container's logs as `kubectl logs` wants them (see [`logs`]).
    pub async fn logs(&self, id: &str, opts: &LogOptions) -> Result<LogStream, DockerError> {
        // Fail now (not mid-stream) when the container does not exist.
        self.inspect(id).await?;
        let since = logs::since(opts, Utc::now());
        let mut b = LogsOptionsBuilder::default()
            .follow(opts.follow)
            .stdout(true)
            .stderr(true)
            .timestamps(true);
        if let Some(n) = opts.tail_lines {
            b = b.tail(&n.to_string());
        }
        if let Some(s) = since {
            let secs = i32::try_from(s.timestamp()).unwrap_or(i32::MAX).max(0);
            b = b.since(secs);
        }
        let id_owned = id.to_owned();
        let raw = self
            .docker
            .logs(id, Some(b.build()))
            .map_ok(LogOutput::into_bytes)
            .map_err(move |e| std::io::Error::other(format!("docker logs {id_owned}: {e}")));
        let filter = logs::LogFilter::new(opts, since);
        Ok(Box::pin(logs::filtered(Box::pin(raw), filter)))
    }

    /// Forwards `stream` to `127.0.0.1:port` inside the container's network namespace.
    pub async fn port_forward(
        &self,
        id: &str,
        port: u16,
        mut stream: PortStream,
    ) -> Result<(), DockerError> {
        let r = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspect", id, e))?;
        let pid = r
            .state
            .as_ref()
            .filter(|s| s.running == Some(true))
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| DockerError::NotRunning(id.to_owned()))?;
        let sock = connect_in_netns(
            pid,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        )
        .await?;
        let mut tcp = tokio::net::TcpStream::from_std(sock).map_err(|source| DockerError::Io {
            what: "registering the port-forward socket".into(),
            source,
        })?;
        match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
            Ok((up, down)) => {
                debug!(container = id, port, up, down, "port-forward closed");
                Ok(())
            }
            // A reset by either side ends the connection; not the runtime's failure.
            Err(e) => {
                debug!(container = id, port, error = %e, "port-forward ended");
                Ok(())
            }
        }
    }

    /// CPU and memory of the container (`name` is the Kubernetes container name).
    /// `usageNanoCores` is the average since the previous call for this container.
    pub async fn stats(&self, id: &str, name: &str) -> Result<ContainerStats, DockerError> {
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let s = self
            .docker
            .stats(id, Some(opts))
            .next()
            .await
            .ok_or_else(|| DockerError::NotFound(id.to_owned()))?
            .map_err(|e| DockerError::api("stats", id, e))?;
        let now = Utc::now();
        let cpu_ns = s
            .cpu_stats
            .as_ref()
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage);
        let nano_cores = cpu_ns.and_then(|ns| {
            let t = Instant::now();
            let prev = lock(&self.cpu_samples).insert(id.to_owned(), (t, ns));
            prev.and_then(|(pt, pns)| {
                let dt = t.duration_since(pt).as_nanos();
                (dt > 0).then(|| {
                    let used = u128::from(ns.saturating_sub(pns));
                    u64::try_from(used * 1_000_000_000 / dt).unwrap_or(u64::MAX)
                })
            })
        });
        let mem = s.memory_stats.as_ref();
        let usage = mem.and_then(|m| m.usage);
        let stat = |k: &str| {
            mem.and_then(|m| m.stats.as_ref())
                .and_then(|s| s.get(k).copied())
        };
        // The kubelet's working set: usage minus inactive file pages (cgroup v2 / v1 keys).
        let inactive = stat("inactive_file").or_else(|| stat("total_inactive_file"));
        let working_set = usage.map(|u| u.saturating_sub(inactive.unwrap_or(0)));
        let rss = stat("anon")
            .or_else(|| stat("rss"))
            .or_else(|| stat("total_rss"));
        let started = self
            .inspect(id)
            .await
            .ok()
            .and_then(|st| match st.status {
                RunState::Running { started_at } => started_at,
                _ => None,
            })
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.to_string()).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(ContainerStats {
            name: name.to_owned(),
            start_time: started,
            cpu: Some(CpuStats {
                time: now,
                usage_nano_cores: nano_cores,
                usage_core_nano_seconds: cpu_ns,
            }),
            memory: Some(MemoryStats {
                time: now,
                available_bytes: mem
                    .and_then(|m| m.limit)
                    .zip(working_set)
                    .map(|(l, w)| l.saturating_sub(w)),
                usage_bytes: usage,
                working_set_bytes: working_set,
                rss_bytes: rss,
                page_faults: stat("pgfault"),
                major_page_faults: stat("pgmajfault"),
            }),
            rootfs: None,
            logs: None,
        })
    }

    /// The container of `pod`/`container` (latest attempt), if any.
    pub async fn find(
        &self,
        pod: &PodKey,
        container: &str,
    ) -> Result<Option<OwnedContainer>, DockerError> {
        Ok(self
            .list_ours(Some(&pod.uid))
            .await?
            .into_iter()
            .filter(|c| c.container == container)
            .max_by_key(|c| c.attempt))
    }
}

/// Kills a probe's exec process when its future is dropped before the process ended.
struct KillExecOnDrop {
    docker: Docker,
    exec_id: String,
}

impl Drop for KillExecOnDrop {
    fn drop(&mut self) {
        if self.exec_id.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (docker, exec_id) = (self.docker.clone(), std::mem::take(&mut self.exec_id));
        handle.spawn(async move {
            let pid = match docker.inspect_exec(&exec_id).await {
                Ok(r) if r.running == Some(true) => r.pid.and_then(|p| i32::try_from(p).ok()),
                Ok(_) => None,
                Err(e) => {
                    debug!(exec = %exec_id, error = %e, "inspecting a timed-out exec");
                    None
                }
            };
            if let Some(pid) = pid.filter(|p| *p > 1) {
                kill_exec_process(&exec_id, pid);
            }
        });
    }
}

/// Kills the process of a timed-out exec by the pid dockerd reports (a host pid: dockerd
/// runs on this Linux host).
#[cfg(target_os = "linux")]
fn kill_exec_process(exec_id: &str, pid: i32) {
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        Ok(()) => debug!(exec = %exec_id, pid, "killed a timed-out exec"),
        Err(e) => warn!(exec = %exec_id, pid, error = %e, "could not kill a timed-out exec"),
    }
}

/// Elsewhere dockerd runs in a Linux VM (Docker Desktop and the like): its pids are the
/// VM's, and signalling that number here would hit an unrelated host process.
#[cfg(not(target_os = "linux"))]
fn kill_exec_process(exec_id: &str, pid: i32) {
    warn!(
        exec = %exec_id,
        pid,
        "a timed-out exec keeps running: dockerd is not on this host, so its pid cannot be signalled"
    );
}

impl SidecarRuntime {
    /// Opens a TCP connection to `addr` from inside the network namespace of the running
    /// container `id` (probes of a side-car dial `127.0.0.1` there). Errors keep the
    /// [`std::io::ErrorKind`] of the connect (e.g. `ConnectionRefused`) in
    /// [`DockerError::Io`].
    pub async fn connect_in(
        &self,
        id: &str,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, DockerError> {
        let r = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspect", id, e))?;
        let pid = r
            .state
            .as_ref()
            .filter(|s| s.running == Some(true))
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| DockerError::NotRunning(id.to_owned()))?;
        let sock = connect_in_netns(pid, addr, timeout).await?;
        tokio::net::TcpStream::from_std(sock).map_err(|source| DockerError::Io {
            what: "registering a socket".into(),
            source,
        })
    }
}

/// Opens a TCP connection to `addr` in the network namespace of process `pid`. Runs on
/// a thread of its own that enters the namespace and then exits, so no pooled thread
/// ever changes namespace; the socket keeps its namespace afterwards.
#[cfg(target_os = "linux")]
async fn connect_in_netns(
    pid: i64,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream, DockerError> {
    let path = format!("/proc/{pid}/ns/net");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = path.clone();
    std::thread::Builder::new()
        .name("vzk-docker-netns".into())
        .spawn(move || {
            let result = (|| {
                let ns = std::fs::File::open(&p)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            })();
            let _ = tx.send(result);
        })
        .map_err(|source| DockerError::Io {
            what: "spawning the port-forward thread".into(),
            source,
        })?;
    rx.await
        .map_err(|_| DockerError::Io {
            what: format!("port-forward thread for {path} died"),
            source: std::io::Error::other("thread ended without an answer"),
        })?
        .map_err(|source| DockerError::Io {
            what: format!("connecting to {addr} in {path}"),
            source,
        })
}

/// Network namespaces are Linux's; elsewhere (Docker Desktop and the like run dockerd in
/// a Linux VM, so `pid` is not even a host process) a container's loopback cannot be
/// reached from the host.
#[cfg(not(target_os = "linux"))]
async fn connect_in_netns(
    pid: i64,
    addr: std::net::SocketAddr,
    _timeout: Duration,
) -> Result<std::net::TcpStream, DockerError> {
    Err(DockerError::Io {
        what: format!("connecting to {addr} in the network namespace of container process {pid}"),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "entering a container's network namespace needs a Linux host running dockerd",
        ),
    })
}
