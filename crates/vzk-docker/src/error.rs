//! [`DockerError`]: what can go wrong talking to dockerd about side-cars.

/// A side-car operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// dockerd cannot be reached (no socket, refused, or it does not answer `/version`).
    /// The node still runs VM-only pods; side-cars wait with reason `DockerUnavailable`.
    #[error("Docker is unreachable: {message}")]
    Unreachable {
        /// What happened.
        message: String,
        /// The cause.
        #[source]
        source: Option<bollard::errors::Error>,
    },
    /// The image name is not a valid reference.
    #[error("invalid image name {image:?}: {reason}")]
    InvalidImage {
        /// The name as given.
        image: String,
        /// Why it is invalid.
        reason: String,
    },
    /// `imagePullPolicy: Never` and the image is not present (the kubelet's
    /// `ErrImageNeverPull`).
    #[error("container image {image:?} is not present with pull policy of Never")]
    ImageNeverPull {
        /// The image.
        image: String,
    },
    /// The registry refused or the pull failed (`ErrImagePull`).
    #[error("pulling image {image:?}: {message}")]
    Pull {
        /// The image.
        image: String,
        /// Docker's message (every credential tried, last error).
        message: String,
    },
    /// The container spec cannot be turned into a Docker container.
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    /// No such container (or exec), e.g. it was removed behind our back.
    #[error("no such container {0}")]
    NotFound(String),
    /// The container is not running (exec/attach/port-forward need it running).
    #[error("container {0} is not running")]
    NotRunning(String),
    /// A Docker API call failed.
    #[error("docker {op} {target}")]
    Api {
        /// The operation (`create`, `start`, `stop`, ...).
        op: &'static str,
        /// The container, exec or image it was about.
        target: String,
        /// The cause.
        #[source]
        source: bollard::errors::Error,
    },
    /// Local I/O (stream copy, entering the container's network namespace).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl DockerError {
    /// Maps a bollard error of `op` on `target`, turning 404s into [`DockerError::NotFound`]
    /// and connection failures into [`DockerError::Unreachable`].
    pub(crate) fn api(op: &'static str, target: &str, source: bollard::errors::Error) -> Self {
        use bollard::errors::Error as E;
        match &source {
            E::DockerResponseServerError {
                status_code: 404, ..
            } => DockerError::NotFound(target.to_owned()),
            E::DockerResponseServerError {
                status_code: 409,
                message,
            } if message.contains("is not running") => DockerError::NotRunning(target.to_owned()),
            E::SocketNotFoundError(_) | E::HyperResponseError { .. } | E::IOError { .. } => {
                DockerError::Unreachable {
                    message: format!("{op} {target}"),
                    source: Some(source),
                }
            }
            _ => DockerError::Api {
                op,
                target: target.to_owned(),
                source,
            },
        }
    }

    /// Whether retrying later may help (Docker down, a transient API failure), as
    /// opposed to a problem of the spec or the image.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DockerError::Unreachable { .. } | DockerError::Api { .. } | DockerError::Io { .. }
        )
    }

    /// The kubelet-style reason for a container waiting because of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            DockerError::Unreachable { .. } => "DockerUnavailable",
            DockerError::InvalidImage { .. } => "InvalidImageName",
            DockerError::ImageNeverPull { .. } => "ErrImageNeverPull",
            DockerError::Pull { .. } => "ErrImagePull",
            DockerError::InvalidSpec(_) => "CreateContainerConfigError",
            DockerError::NotFound(_) | DockerError::NotRunning(_) => "ContainerNotFound",
            DockerError::Api { op: "start", .. } => "RunContainerError",
            DockerError::Api { .. } | DockerError::Io { .. } => "CreateContainerError",
        }
    }
}

/// `a: b: c` of an error and its sources (the runtime's one printer).
pub use vzk_core::error_chain;
