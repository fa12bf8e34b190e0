//! Mutual TLS 1.3 between nodes: the certificate verifiers that decide whom a node accepts, and
//! the rustls and quinn configurations built on them, all on the ring provider (passed
//! explicitly; no process-wide default is needed).
//!
//! Both ends check each other with the same rule ([`Trust`]): the peer's end-entity
//! certificate is accepted if its SHA-256 fingerprint is pinned, or if it chains to a trusted CA
//! (rustls's webpki verification; names are not checked, a node is reached by address and
//! known by its certificate). A pinned self-signed certificate proves possession of its key by
//! the TLS 1.3 handshake signature, which is checked like any other. Anything else is refused
//! during the handshake, logged with its fingerprint and reported through `on_refused`.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

use crate::error::{Error, Result};
use crate::identity::{Fingerprint, NodeIdentity, Trust};

/// ALPN of node-to-node connections (this protocol, `PROTOCOL.md`).
pub const ALPN_NODE: &[u8] = b"herald/1";

/// ALPN of client connections (`crate::client`, "Client protocol" in `PROTOCOL.md`), served on
/// the same endpoint.
pub const ALPN_CLIENT: &[u8] = b"herald-client/1";

/// A QUIC connection with no traffic for this long is lost. Keep-alives keep an idle but
/// healthy connection open; a peer that vanished (no close) is noticed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of QUIC keep-alive pings on an otherwise idle connection; well under
/// [`IDLE_TIMEOUT`] so that a lost ping or two does not close a healthy connection.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);

/// Bidirectional streams a peer may open on one connection: the one stream of the node
/// protocol.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1;

/// What to do when a peer is refused: `(fingerprint, reason)`.
pub(crate) type OnRefused = Arc<dyn Fn(Fingerprint, String) + Send + Sync>;

/// The QUIC client configuration a node dials peers with: its certificate as client
/// certificate, the peer checked against `trust`, ALPN [`ALPN_NODE`], TLS 1.3 only.
pub fn client_config(identity: &NodeIdentity, trust: &Trust) -> Result<quinn::ClientConfig> {
    client_config_with(identity, trust, IDLE_TIMEOUT, Arc::new(|_, _| {}))
}

/// The QUIC server configuration a node accepts peers with: client certificates required and
/// checked against `trust`, ALPN [`ALPN_NODE`], TLS 1.3 only.
pub fn server_config(identity: &NodeIdentity, trust: &Trust) -> Result<quinn::ServerConfig> {
    server_config_with(identity, trust, IDLE_TIMEOUT, Arc::new(|_, _| {}))
}

pub(crate) fn client_config_with(
    identity: &NodeIdentity,
    trust: &Trust,
    idle_timeout: Duration,
    on_refused: OnRefused,
) -> Result<quinn::ClientConfig> {
    client_config_for(
        identity.certificate_chain(),
        identity.key(),
        trust,
        ALPN_NODE,
        idle_timeout,
        on_refused,
    )
}

/// A QUIC client configuration presenting `certificate_chain` (with `key`), checking the server
/// against `trust`, offering `alpn`, TLS 1.3 only.
pub(crate) fn client_config_for(
    certificate_chain: &[CertificateDer<'static>],
    key: &rustls::pki_types::PrivateKeyDer<'static>,
    trust: &Trust,
    alpn: &[u8],
    idle_timeout: Duration,
    on_refused: OnRefused,
) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier::new(trust, provider.clone(), on_refused)?);
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls("choosing TLS 1.3"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certificate_chain.to_vec(), key.clone_key())
        .map_err(tls("loading the certificate"))?;
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).map_err(tls("building the QUIC client"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(idle_timeout)?);
    Ok(config)
}

pub(crate) fn server_config_with(
    identity: &NodeIdentity,
    trust: &Trust,
    idle_timeout: Duration,
    on_refused: OnRefused,
) -> Result<quinn::ServerConfig> {
    server_config_for(identity, trust, &[ALPN_NODE], idle_timeout, on_refused)
}

/// The server configuration serving `alpns`, clients checked against `trust`.
pub(crate) fn server_config_for(
    identity: &NodeIdentity,
    trust: &Trust,
    alpns: &[&[u8]],
    idle_timeout: Duration,
    on_refused: OnRefused,
) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier::new(trust, provider.clone(), on_refused)?);
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls("choosing TLS 1.3"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            identity.certificate_chain().to_vec(),
            identity.key().clone_key(),
        )
        .map_err(tls("loading the node certificate"))?;
    // The accept loop dispatches on ALPN.
    crypto.alpn_protocols = alpns.iter().map(|alpn| alpn.to_vec()).collect();
    let crypto = QuicServerConfig::try_from(crypto).map_err(tls("building the QUIC server"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(idle_timeout)?);
    Ok(config)
}

/// The fingerprint of the certificate a connected peer presented.
pub(crate) fn peer_fingerprint(connection: &quinn::Connection) -> Option<Fingerprint> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain
        .first()
        .map(|certificate| Fingerprint::of(certificate))
}

/// The ALPN protocol a connection agreed on.
pub(crate) fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    let data = connection.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

/// The TLS server name a dialed session gives each of its connections: `token` (random, one
/// per dialed session) in a DNS label before the node certificate's name. Certificates are
/// checked by fingerprint or CA, never by this name, so it is free to say which session a
/// connection belongs to (see [`dialer_token`]).
pub(crate) fn dialer_server_name(token: u64) -> String {
    format!("s{token:016x}.{}", crate::identity::CERTIFICATE_NAME)
}

/// The dialed-session token an accepted connection's server name carries; 0 when it carries
/// none (a bare certificate name).
pub(crate) fn dialer_token(connection: &quinn::Connection) -> u64 {
    let Some(data) = connection.handshake_data() else {
        return 0;
    };
    let Ok(data) = data.downcast::<quinn::crypto::rustls::HandshakeData>() else {
        return 0;
    };
    data.server_name.as_deref().map_or(0, token_of)
}

/// The token in a server name [`dialer_server_name`] made; 0 for any other name.
fn token_of(server_name: &str) -> u64 {
    server_name
        .strip_prefix('s')
        .and_then(|name| name.strip_suffix(crate::identity::CERTIFICATE_NAME))
        .and_then(|name| name.strip_suffix('.'))
        .filter(|hex| hex.len() == 16)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The endpoint configuration: its stateless-reset key ([`stateless_reset_key`]) and the key
/// its connection ids are made with ([`connection_id_key`]) both derived from the node's private
/// key, so that after a restart the node still recognises the ids of connections it had (a
/// random key makes it drop their packets unanswered) and answers them with a stateless reset
/// its peers accept.
pub(crate) fn endpoint_config(identity: &NodeIdentity) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::new(Arc::new(stateless_reset_key(identity)));
    let cid_key = connection_id_key(identity);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The key of the check value a node's connection ids carry (quinn's
/// `HashedConnectionIdGenerator`), derived like [`stateless_reset_key`].
pub fn connection_id_key(identity: &NodeIdentity) -> u64 {
    let mut key = [0u8; 8];
    derive(identity, CONNECTION_ID_INFO, &mut key);
    u64::from_le_bytes(key)
}

/// The key a node's stateless-reset tokens are made with (HMAC-SHA256 of the connection id),
/// derived with HKDF-SHA256 from its private key, so it is the same after a restart and secret
/// like the key. With a random key per endpoint (quinn's default) a restarted node's resets
/// carry tokens its peers do not know, so they ignore them and keep the dead connection until
/// [`IDLE_TIMEOUT`]; with this one they close it at the first packet and dial again.
pub fn stateless_reset_key(identity: &NodeIdentity) -> ring::hmac::Key {
    let mut key = [0u8; 32];
    derive(identity, STATELESS_RESET_INFO, &mut key);
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key)
}

/// Fills `out` with HKDF-SHA256 of the node's private key for the use `info`.
fn derive(identity: &NodeIdentity, info: &[u8], out: &mut [u8]) {
    /// Output length for `hkdf::Prk::expand`.
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, DERIVATION_SALT)
        .extract(identity.key().secret_der())
        .expand(&[info], Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("8 and 32 bytes are valid HKDF-SHA256 output lengths");
}

/// HKDF salt and infos of the keys derived from a node's private key: they separate these uses
/// of it from each other and from any other.
const DERIVATION_SALT: &[u8] = b"herald node";
const STATELESS_RESET_INFO: &[u8] = b"quic stateless reset key v1";
const CONNECTION_ID_INFO: &[u8] = b"quic connection id key v1";

fn transport_config(idle_timeout: Duration) -> Result<Arc<quinn::TransportConfig>> {
    let mut config = quinn::TransportConfig::default();
    let idle =
        quinn::IdleTimeout::try_from(idle_timeout).map_err(tls("setting the idle timeout"))?;
    config
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        // Nothing reads datagrams: none are taken (quinn's default buffers 1.25 MB of them).
        .datagram_receive_buffer_size(None);
    Ok(Arc::new(config))
}

fn tls<E: fmt::Display>(context: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Tls {
        context,
        reason: e.to_string(),
    }
}

/// Accepts a peer certificate if it is pinned or chains to a trusted CA; used on both ends.
struct PeerVerifier {
    pinned: HashSet<Fingerprint>,
    /// The CA path, if any CA is trusted.
    roots: Option<Arc<RootCertStore>>,
    client_ca: Option<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
    on_refused: OnRefused,
}

impl PeerVerifier {
    fn new(
        trust: &Trust,
        provider: Arc<CryptoProvider>,
        on_refused: OnRefused,
    ) -> Result<PeerVerifier> {
        if trust.pinned.is_empty() && trust.ca_certificates.is_empty() {
            return Err(Error::InvalidTrust {
                reason: "no pinned fingerprint and no CA: no peer could connect".into(),
            });
        }
        let (roots, client_ca) = if trust.ca_certificates.is_empty() {
            (None, None)
        } else {
            let mut roots = RootCertStore::empty();
            for certificate in &trust.ca_certificates {
                roots
                    .add(certificate.clone())
                    .map_err(|e| Error::InvalidTrust {
                        reason: format!("CA certificate not usable: {e}"),
                    })?;
            }
            let roots = Arc::new(roots);
            let client_ca =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| Error::InvalidTrust {
                        reason: format!("CA verifier: {e}"),
                    })?;
            (Some(roots), Some(client_ca))
        };
        Ok(PeerVerifier {
            pinned: trust.pinned.iter().copied().collect(),
            roots,
            client_ca,
            provider,
            on_refused,
        })
    }

    /// Whether `end_entity` is trusted; `side` names the peer's role for the log.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        side: Side,
    ) -> std::result::Result<(), rustls::Error> {
        let fingerprint = Fingerprint::of(end_entity);
        if self.pinned.contains(&fingerprint) {
            return Ok(());
        }
        let reason = match (&self.roots, &self.client_ca, side) {
            (None, _, _) | (_, None, _) => "fingerprint not pinned and no CA trusted".to_owned(),
            (Some(_), Some(client_ca), Side::Client) => {
                match client_ca.verify_client_cert(end_entity, intermediates, now) {
                    Ok(_) => return Ok(()),
                    Err(e) => format!("fingerprint not pinned; CA path: {e}"),
                }
            }
            (Some(roots), Some(_), Side::Server) => {
                let chained = ParsedCertificate::try_from(end_entity).and_then(|parsed| {
                    rustls::client::verify_server_cert_signed_by_trust_anchor(
                        &parsed,
                        roots,
                        intermediates,
                        now,
                        self.provider.signature_verification_algorithms.all,
                    )
                });
                match chained {
                    Ok(()) => return Ok(()),
                    Err(e) => format!("fingerprint not pinned; CA path: {e}"),
                }
            }
        };
        if refusal_warnings().allow() {
            tracing::warn!(
                %fingerprint,
                peer = side.name(),
                %reason,
                "refusing an untrusted peer"
            );
        } else {
            tracing::debug!(%fingerprint, peer = side.name(), %reason, "refusing an untrusted peer");
        }
        (self.on_refused)(fingerprint, reason);
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    /// The peer dialed us.
    Client,
    /// We dialed the peer.
    Server,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("pinned", &self.pinned)
            .field("ca", &self.roots.as_ref().map(|roots| roots.len()))
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, Side::Server)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so rustls never asks.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, certificate, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a node has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, Side::Client)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, certificate, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Warnings about refused peers per second, at most: anyone can make this node refuse them,
/// as fast as it completes handshakes, and each warning is a line in the node's log. The rest
/// go at debug level.
pub const REFUSAL_WARNINGS_PER_SECOND_MAX: u32 = 10;

/// Counts the refusal warnings of the current second (process-wide).
fn refusal_warnings() -> &'static RateLimit {
    static LIMIT: RateLimit = RateLimit::new(REFUSAL_WARNINGS_PER_SECOND_MAX);
    &LIMIT
}

/// Allows at most `per_second` events in each second of the clock.
#[derive(Debug)]
struct RateLimit {
    per_second: u32,
    /// The second counted (UNIX time) in the high 32 bits, events in it in the low 32.
    state: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    const fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            state: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn allow(&self) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        self.allow_at(second)
    }

    fn allow_at(&self, second: u32) -> bool {
        use std::sync::atomic::Ordering;
        let mut allowed = false;
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |state| {
                let (counted, events) = ((state >> 32) as u32, state as u32);
                let events = if counted == second { events } else { 0 };
                allowed = events < self.per_second;
                Some((u64::from(second) << 32) | u64::from(events.saturating_add(1)))
            });
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_limit_in_a_second_and_again_in_the_next() {
        let limit = RateLimit::new(3);
        let allowed: Vec<bool> = (0..5).map(|_| limit.allow_at(7)).collect();
        assert_eq!(allowed, [true, true, true, false, false]);
        assert!(limit.allow_at(8), "a new second");
    }

    #[test]
    fn a_dialed_sessions_token_survives_its_server_name_and_other_names_give_none() {
        for token in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX] {
            let name = dialer_server_name(token);
            assert!(rustls::pki_types::ServerName::try_from(name.as_str()).is_ok());
            assert_eq!(token_of(&name), token);
        }
        let certificate_name = crate::identity::CERTIFICATE_NAME;
        for other in [
            certificate_name.to_owned(),
            format!("s12.{certificate_name}"),
            format!("x0123456789abcdef.{certificate_name}"),
            format!("s0123456789abcdeg.{certificate_name}"),
            "s0123456789abcdef.example".to_owned(),
            String::new(),
        ] {
            assert_eq!(token_of(&other), 0, "{other}");
        }
    }
}
