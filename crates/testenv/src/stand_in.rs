//! An agent stand-in: a client that speaks the agent protocol over mTLS with a given
//! identity and nothing else, for tests and benches of the hub's side only (a revoked
//! certificate, log chunks with chosen offsets, many sessions at once).

use shapeblock_proto::v1::agent_message::Body as Up;
use shapeblock_proto::v1::agent_tunnel_client::AgentTunnelClient;
use shapeblock_proto::v1::{AgentMessage, Hello, ServerMessage};
use tokio::sync::mpsc;
use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// An open tunnel: what the stand-in sends up, and what the hub sends down.
pub struct StandIn {
    pub up: mpsc::Sender<AgentMessage>,
    pub down: tonic::Streaming<ServerMessage>,
}

impl StandIn {
    /// Dials `url` (the hub's agent listener, served as `127.0.0.1`) with `cert_pem`/`key_pem`,
    /// sends a `Hello` naming `version`, and returns once the hub accepted the stream. `depth`
    /// bounds what waits to go up. The hub's refusal (a revoked or unknown certificate) is its
    /// `Status`; a failed connection is `UNAVAILABLE`.
    pub async fn dial(
        url: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        version: &str,
        depth: usize,
    ) -> Result<Self, Status> {
        let hello = Hello {
            agent_version: version.into(),
            ..Default::default()
        };
        Self::dial_with(url, ca_pem, (cert_pem, key_pem), hello, depth).await
    }

    /// [`StandIn::dial`] saying `hello` (capabilities, an inventory).
    pub async fn dial_with(
        url: &str,
        ca_pem: &str,
        (cert_pem, key_pem): (&str, &str),
        hello: Hello,
        depth: usize,
    ) -> Result<Self, Status> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("127.0.0.1")
            .identity(Identity::from_pem(cert_pem, key_pem));
        let channel = Endpoint::from_shared(url.to_string())
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (up, rx) = mpsc::channel(depth.max(1));
        up.send(AgentMessage {
            seq: 0,
            body: Some(Up::Hello(hello)),
        })
        .await
        .map_err(|_| Status::internal("the stand-in's own channel closed"))?;
        let down = AgentTunnelClient::new(channel)
            .tunnel(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { up, down })
    }
}
