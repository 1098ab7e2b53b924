//! The gRPC face of the plugin: Identity and Node services on a unix socket.

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::pb::identity_server::{Identity, IdentityServer};
use super::pb::node_server::{Node, NodeServer};
use super::pb::*;
use super::{
    CacheResolver, CsiError, DRIVER_NAME, Mounter, Plugin, validate_publish, validate_target,
};

pub struct IdentityService<R: CacheResolver, M: Mounter>(pub Arc<Plugin<R, M>>);
pub struct NodeService<R: CacheResolver, M: Mounter>(pub Arc<Plugin<R, M>>);

#[tonic::async_trait]
impl<R: CacheResolver, M: Mounter> Identity for IdentityService<R, M> {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: super::plugin_manifest().into_iter().collect(),
        }))
    }

    /// No controller service and no topology: GKM is a node-only plugin.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.0.is_ready()),
        }))
    }
}

#[tonic::async_trait]
impl<R: CacheResolver, M: Mounter> Node for NodeService<R, M> {
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = match validate_publish(req.get_ref()) {
            Ok(v) => self.0.publish(&v).await,
            Err(e) => Err(e),
        };
        observe("publish", started, &result);
        result?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let r = req.get_ref();
        let result = match super::validate_volume_id(&r.volume_id)
            .and_then(|()| validate_target(&r.target_path))
        {
            Ok(target) => self.0.unpublish(&r.volume_id, &target).await,
            Err(e) => Err(e),
        };
        observe("unpublish", started, &result);
        result?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    /// Nothing beyond publish/unpublish: each capability advertised turns on kubelet
    /// calls (and csi-sanity specs) that would have to be implemented.
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.config().node_name.clone(),
            max_volumes_per_node: self.0.config().max_volumes_per_node,
            accessible_topology: None,
        }))
    }
}

/// Counts a node call and its latency under its gRPC code.
fn observe(op: &str, started: std::time::Instant, result: &Result<(), CsiError>) {
    let code = match result {
        Ok(()) => tonic::Code::Ok,
        Err(e) => e.code(),
    };
    crate::metrics::global().csi_call(op, &code_name(code), started.elapsed().as_secs_f64());
}

/// The canonical gRPC name of a code (`OK`, `NOT_FOUND`, `FAILED_PRECONDITION`).
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_have_their_canonical_names() {
        use tonic::Code;
        assert_eq!(super::code_name(Code::Ok), "OK");
        assert_eq!(super::code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(
            super::code_name(Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("preparing socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the plugin on the unix socket `path` (a stale socket file is replaced) until
/// `shutdown` completes.
pub async fn serve<R: CacheResolver, M: Mounter>(
    plugin: Arc<Plugin<R, M>>,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let sock_err = |source| ServeError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService(plugin.clone())))
        .add_service(NodeServer::new(NodeService(plugin)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// A gRPC channel to a plugin's unix socket, with `:authority localhost` as kubelet sends.
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// A channel to the plugin at `path` once its Probe answers ready, trying every 50 ms for
/// at most `timeout`; the last reason it was not, on timeout.
pub async fn connect_ready(
    path: &Path,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let why = match connect(path).await {
            Ok(ch) => match super::pb::identity_client::IdentityClient::new(ch.clone())
                .probe(ProbeRequest {})
                .await
            {
                Ok(r) if r.get_ref().ready == Some(true) => return Ok(ch),
                Ok(_) => "the plugin says it is not ready".to_string(),
                Err(e) => format!("Probe failed: {e}"),
            },
            Err(e) => format!("cannot connect to {}: {e}", path.display()),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
