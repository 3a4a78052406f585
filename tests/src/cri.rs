//! A client of the Container Runtime Interface (`runtime.v1.RuntimeService`, gRPC on a unix
//! socket): the calls a kubelet makes to start and end a pod sandbox, which is where containerd
//! runs the CNI plugin. Only the messages and fields these calls need are declared, with the
//! field numbers of k8s.io/cri-api's api.proto (protobuf ignores what it does not declare), so
//! no protoc step or generated code is needed.

use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use tonic::{
    Status,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

/// A host port a pod asks for (`hostPort` in a pod spec); protocol 0 is TCP.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PortMapping {
    #[prost(int32, tag = "1")]
    pub protocol: i32,
    #[prost(int32, tag = "2")]
    pub container_port: i32,
    #[prost(int32, tag = "3")]
    pub host_port: i32,
    #[prost(string, tag = "4")]
    pub host_ip: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(message, repeated, tag = "5")]
    pub port_mappings: Vec<PortMapping>,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// StopPodSandbox, RemovePodSandbox and PodSandboxStatus all name a sandbox (field 1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SandboxRef {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    /// 0: ready, 1: not ready.
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
}

/// A CRI client on one runtime socket, blocking (it has a runtime of its own), for the tests.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<Channel>,
}

impl Cri {
    /// Connects to the runtime's CRI socket.
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let path = socket.to_owned();
        let channel = rt
            .block_on(async move {
                // The URI is not used: every connection goes to the unix socket.
                Endpoint::try_from("http://cri.invalid")?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
        Ok(Self { rt, grpc: tonic::client::Grpc::new(channel) })
    }

    fn call<Req, Resp>(&mut self, method: &str, req: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let path = PathAndQuery::try_from(format!("/runtime.v1.RuntimeService/{method}"))
            .map_err(|e| Status::internal(e.to_string()))?;
        let grpc = &mut self.grpc;
        self.rt.block_on(async {
            grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            grpc.unary(tonic::Request::new(req), path, codec).await.map(tonic::Response::into_inner)
        })
    }

    pub fn version(&mut self) -> Result<VersionResponse, Status> {
        self.call("Version", VersionRequest { version: "v1".into() })
    }

    /// RunPodSandbox: the sandbox's id.
    pub fn run_pod_sandbox(&mut self, config: PodSandboxConfig) -> Result<String, Status> {
        let req = RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        self.call::<_, RunPodSandboxResponse>("RunPodSandbox", req).map(|r| r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), Status> {
        self.call::<_, Empty>("StopPodSandbox", SandboxRef { pod_sandbox_id: id.into() }).map(drop)
    }

    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), Status> {
        self.call::<_, Empty>("RemovePodSandbox", SandboxRef { pod_sandbox_id: id.into() }).map(drop)
    }

    pub fn pod_sandbox_status(&mut self, id: &str) -> Result<PodSandboxStatus, Status> {
        self.call::<_, PodSandboxStatusResponse>("PodSandboxStatus", SandboxRef { pod_sandbox_id: id.into() })
            .map(|r| r.status.unwrap_or_default())
    }
}

/// A pod's sandbox configuration as a kubelet sends it, reduced to what matters here.
pub fn pod(name: &str, namespace: &str, uid: &str, cgroup_parent: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig { cgroup_parent: cgroup_parent.into() }),
        ..Default::default()
    }
}
