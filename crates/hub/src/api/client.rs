//! A Rust client of the API with its key (what the CLI, the tests and the benches use).

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use shapeblock_proto::MAX_MESSAGE_BYTES;

use super::v1;

/// Puts the API key on every call of a [`Client`].
#[derive(Clone)]
pub struct BearerKey(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A client of the API with its key (what the CLI and Rust callers use).
pub type Client = v1::hub_client::HubClient<InterceptedService<tonic::transport::Channel, BearerKey>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the API key is not a header value")]
    Key,
    #[error("hub address {address:?}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach the hub's API at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
}

/// Connects to the API at `address` (`https://host:port`), trusting `ca_pem` (the hub's CA).
pub async fn connect(address: &str, api_key: &str, ca_pem: &str) -> Result<Client, ConnectError> {
    let key = format!("Bearer {}", api_key.trim())
        .parse()
        .map_err(|_| ConnectError::Key)?;
    let address = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    let channel = tonic::transport::Endpoint::from_shared(address.clone())
        .and_then(|e| e.tls_config(tls))
        .map_err(|source| ConnectError::Address {
            address: address.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|source| ConnectError::Connect { address, source })?;
    Ok(
        v1::hub_client::HubClient::with_interceptor(channel, BearerKey(key))
            .max_decoding_message_size(MAX_MESSAGE_BYTES * 2)
            .max_encoding_message_size(MAX_MESSAGE_BYTES * 2),
    )
}
