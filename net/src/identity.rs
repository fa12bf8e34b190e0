//! A node's identity and whom it trusts.
//!
//! - [`NodeIdentity`]: this node's broker instance id (a UUID) and its certificate and private
//!   key, generated on first start (rcgen, ECDSA P-256, self-signed) and kept in a directory.
//! - [`Fingerprint`]: SHA-256 of a certificate's DER bytes; a peer's identity after the TLS
//!   handshake is its end-entity certificate's fingerprint (and its broker id, from its Hello).
//! - [`Trust`]: the peers this node accepts: pinned fingerprints and/or CA certificates.
//!
//! Invariants of the identity directory:
//!
//! 1. Every file is written whole or not at all: to a temporary file, synced, renamed over the
//!    name, and the directory synced. The key file is created with mode 0600 on Unix.
//! 2. `broker-id` is written last and marks a complete identity: without it, creation never
//!    finished (nothing ever ran with those files), so they are made anew. With it, the
//!    certificate and key must be there and parse, and the key must be the certificate's;
//!    otherwise loading fails with [`Error::CorruptIdentity`] rather than make a new identity
//!    that the node's peers would not trust.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use uuid::Uuid;

use crate::error::{Error, Result};

/// File holding the broker instance id, as a hyphenated UUID and a newline.
pub const BROKER_ID_FILE: &str = "broker-id";
/// File holding the node's certificate (PEM).
pub const CERTIFICATE_FILE: &str = "node.crt.pem";
/// File holding the node's private key (PKCS #8, PEM), mode 0600 on Unix.
pub const KEY_FILE: &str = "node.key.pem";
/// Largest identity file read: a certificate chain of a few certificates fits many times over;
/// anything larger is not an identity file.
pub const IDENTITY_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// File (in the node's identity directory) holding the local admin client certificate (PEM),
/// which the node always trusts for the client protocol (never for node-to-node), so that a
/// client on the same machine (`herald exec`) needs no certificate handling.
pub const ADMIN_CLIENT_CERTIFICATE_FILE: &str = "admin-client.crt.pem";
/// File holding the admin client certificate's private key (PKCS #8, PEM), mode 0600 on Unix.
pub const ADMIN_CLIENT_KEY_FILE: &str = "admin-client.key.pem";
/// The subject alternative name of generated client certificates.
pub const CLIENT_CERTIFICATE_NAME: &str = "herald-client";
/// The subject alternative name of generated certificates. Names are not checked between nodes
/// (a peer is reached by address and known by its certificate), but a certificate needs one.
pub const CERTIFICATE_NAME: &str = "herald-node";

/// SHA-256 of a certificate's DER encoding: how a node names a peer's certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(certificate_der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, certificate_der);
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }
}

impl fmt::Display for Fingerprint {
    /// Lowercase hex, 64 digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    /// 64 hex digits, either case; `:` separators (as `openssl x509 -fingerprint` prints) are
    /// allowed.
    fn from_str(text: &str) -> Result<Fingerprint> {
        let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
        let invalid = || Error::InvalidTrust {
            reason: format!("fingerprint {text:?} is not 64 hex digits"),
        };
        if digits.len() != 64 {
            return Err(invalid());
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
        }
        Ok(Fingerprint(bytes))
    }
}

/// This node: its broker instance id, its certificate chain (end-entity first) and private key.
pub struct NodeIdentity {
    broker_instance: Uuid,
    certificate_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl NodeIdentity {
    /// Loads the identity kept in `dir`, or makes one (a new broker instance id and a
    /// self-signed certificate) and writes it there if `dir` holds none. See the module
    /// documentation for what counts as none, and for corrupt files.
    pub fn load_or_create(dir: &Path) -> Result<NodeIdentity> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), &e))?;
        let broker_id_path = dir.join(BROKER_ID_FILE);
        match broker_id_path.try_exists() {
            Ok(true) => NodeIdentity::load(dir),
            Ok(false) => {
                let identity = NodeIdentity::generate()?;
                identity.write(dir)?;
                tracing::info!(
                    broker_instance = %identity.broker_instance,
                    fingerprint = %identity.fingerprint,
                    dir = %dir.display(),
                    "created node identity"
                );
                Ok(identity)
            }
            Err(e) => Err(Error::io(
                format!("checking {}", broker_id_path.display()),
                &e,
            )),
        }
    }

    /// A new identity in memory: a random broker instance id and a self-signed ECDSA P-256
    /// certificate valid for client and server authentication.
    pub fn generate() -> Result<NodeIdentity> {
        let broker_instance = Uuid::new_v4();
        let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
        let params = node_certificate_params(&format!("herald node {broker_instance}"))?;
        let certificate = params.self_signed(&key).map_err(rcgen_error)?;
        NodeIdentity::from_parts(
            broker_instance,
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// An identity from its parts, such as a certificate issued by the operators' CA. The chain
    /// starts with the node's own certificate; the key must be that certificate's.
    pub fn from_parts(
        broker_instance: Uuid,
        certificate_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<NodeIdentity> {
        check_key_matches(&certificate_chain, &key).map_err(|reason| Error::Tls {
            context: "checking the node's certificate and key",
            reason,
        })?;
        let fingerprint = Fingerprint::of(&certificate_chain[0]);
        Ok(NodeIdentity {
            broker_instance,
            certificate_chain,
            key,
            fingerprint,
        })
    }

    /// Writes this identity into `dir` (created if missing), each file atomically and
    /// `broker-id` last, replacing what was there.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_certificate_and_key(
            &dir.join(CERTIFICATE_FILE),
            &dir.join(KEY_FILE),
            &self.certificate_chain,
            &self.key,
        )?;
        let broker_id = format!("{}\n", self.broker_instance.hyphenated());
        write_atomically(&dir.join(BROKER_ID_FILE), broker_id.as_bytes(), false)
    }

    /// The fingerprint of the node certificate kept in identity directory `dir`, read without
    /// loading (or making) the rest: what a local client pins.
    pub fn fingerprint_in(dir: &Path) -> Result<Fingerprint> {
        let path = dir.join(CERTIFICATE_FILE);
        let pem_bytes = read_pem_file(&path)?;
        let first = CertificateDer::pem_slice_iter(&pem_bytes)
            .next()
            .ok_or_else(|| corrupt(&path, "holds no certificate"))?
            .map_err(|e| corrupt(&path, &format!("not a PEM certificate: {e}")))?;
        Ok(Fingerprint::of(&first))
    }

    /// This node's broker instance id.
    pub fn broker_instance(&self) -> Uuid {
        self.broker_instance
    }

    /// SHA-256 of this node's certificate (DER): what peers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// This node's certificate chain, its own certificate first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.certificate_chain
    }

    /// This node's own certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate_chain[0]
    }

    /// This node's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    fn load(dir: &Path) -> Result<NodeIdentity> {
        let broker_id_path = dir.join(BROKER_ID_FILE);
        let text = read_identity_file(&broker_id_path)?;
        let broker_instance = std::str::from_utf8(&text)
            .ok()
            .and_then(|text| Uuid::parse_str(text.trim()).ok())
            .ok_or_else(|| corrupt(&broker_id_path, "not a UUID"))?;

        let (certificate_chain, key) = read_certificate_and_key(
            &dir.join(CERTIFICATE_FILE),
            &dir.join(KEY_FILE),
            read_identity_file,
        )?;
        let fingerprint = Fingerprint::of(&certificate_chain[0]);
        Ok(NodeIdentity {
            broker_instance,
            certificate_chain,
            key,
            fingerprint,
        })
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> NodeIdentity {
        NodeIdentity {
            broker_instance: self.broker_instance,
            certificate_chain: self.certificate_chain.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl fmt::Debug for NodeIdentity {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("broker_instance", &self.broker_instance)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A client's certificate chain (its own certificate first) and private key: what a client of
/// the client protocol presents to a node ([`crate::client::Client::connect`]).
///
/// The node's local admin client identity lives beside the node's own, in the identity
/// directory: [`ADMIN_CLIENT_CERTIFICATE_FILE`] and [`ADMIN_CLIENT_KEY_FILE`], written the same
/// way (each file atomically; the key first, the certificate last, so a certificate file marks a
/// complete pair).
pub struct ClientIdentity {
    certificate_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl ClientIdentity {
    /// A new self-signed ECDSA P-256 client certificate with `common_name`.
    pub fn generate(common_name: &str) -> Result<ClientIdentity> {
        let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
        let mut params = rcgen::CertificateParams::new(vec![CLIENT_CERTIFICATE_NAME.to_owned()])
            .map_err(rcgen_error)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.self_signed(&key).map_err(rcgen_error)?;
        ClientIdentity::from_parts(
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// An identity from its parts (a certificate issued by the operators' CA, say); the key
    /// must be the chain's first certificate's.
    pub fn from_parts(
        certificate_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClientIdentity> {
        check_key_matches(&certificate_chain, &key).map_err(|reason| Error::Tls {
            context: "checking the client certificate and key",
            reason,
        })?;
        let fingerprint = Fingerprint::of(&certificate_chain[0]);
        Ok(ClientIdentity {
            certificate_chain,
            key,
            fingerprint,
        })
    }

    /// Loads a certificate chain and key from PEM files.
    pub fn load(certificate_path: &Path, key_path: &Path) -> Result<ClientIdentity> {
        let (certificate_chain, key) =
            read_certificate_and_key(certificate_path, key_path, read_pem_file)?;
        let fingerprint = Fingerprint::of(&certificate_chain[0]);
        Ok(ClientIdentity {
            certificate_chain,
            key,
            fingerprint,
        })
    }

    /// The node's local admin client identity in identity directory `dir`, made and written
    /// there on first use ([`ADMIN_CLIENT_CERTIFICATE_FILE`], [`ADMIN_CLIENT_KEY_FILE`]).
    pub fn load_or_create_admin(dir: &Path) -> Result<ClientIdentity> {
        let certificate_path = dir.join(ADMIN_CLIENT_CERTIFICATE_FILE);
        let key_path = dir.join(ADMIN_CLIENT_KEY_FILE);
        match certificate_path.try_exists() {
            Ok(true) => ClientIdentity::load(&certificate_path, &key_path),
            Ok(false) => {
                let identity = ClientIdentity::generate("herald local admin")?;
                write_certificate_and_key(
                    &certificate_path,
                    &key_path,
                    &identity.certificate_chain,
                    &identity.key,
                )?;
                tracing::info!(
                    fingerprint = %identity.fingerprint,
                    dir = %dir.display(),
                    "created the local admin client certificate"
                );
                Ok(identity)
            }
            Err(e) => Err(Error::io(
                format!("checking {}", certificate_path.display()),
                &e,
            )),
        }
    }

    /// SHA-256 of the client's certificate: what a node pins to trust it.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The certificate chain, the client's own certificate first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.certificate_chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

impl Clone for ClientIdentity {
    fn clone(&self) -> ClientIdentity {
        ClientIdentity {
            certificate_chain: self.certificate_chain.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl fmt::Debug for ClientIdentity {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The peers this node accepts: a peer is trusted if its end-entity certificate's fingerprint
/// is pinned, or if its certificate chains to one of the CA certificates (names are not
/// checked; a CA-issued node certificate needs the clientAuth and serverAuth extended key
/// usages, or none). Both sides of every connection check the other.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Pinned end-entity certificate fingerprints (self-signed node certificates).
    pub pinned: Vec<Fingerprint>,
    /// Trusted CA certificates (DER).
    pub ca_certificates: Vec<CertificateDer<'static>>,
}

impl Trust {
    /// Trusts no one yet.
    pub fn new() -> Trust {
        Trust::default()
    }

    /// Trusts exactly these fingerprints.
    pub fn pinned(fingerprints: impl IntoIterator<Item = Fingerprint>) -> Trust {
        Trust {
            pinned: fingerprints.into_iter().collect(),
            ca_certificates: Vec::new(),
        }
    }

    /// Also trusts a certificate with this fingerprint.
    pub fn pin(mut self, fingerprint: Fingerprint) -> Trust {
        self.pinned.push(fingerprint);
        self
    }

    /// Also trusts every certificate in `pem` as a CA.
    pub fn add_ca_pem(mut self, pem: &[u8]) -> Result<Trust> {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidTrust {
                reason: format!("CA certificates are not PEM: {e}"),
            })?;
        if certificates.is_empty() {
            return Err(Error::InvalidTrust {
                reason: "CA PEM holds no certificate".into(),
            });
        }
        self.ca_certificates.extend(certificates);
        Ok(self)
    }

    /// Also trusts this CA certificate (DER).
    pub fn add_ca(mut self, certificate: CertificateDer<'static>) -> Trust {
        self.ca_certificates.push(certificate);
        self
    }

    /// Whether a certificate with this fingerprint is pinned.
    pub fn is_pinned(&self, fingerprint: &Fingerprint) -> bool {
        self.pinned.contains(fingerprint)
    }
}

/// Certificate parameters of a node certificate: the name [`CERTIFICATE_NAME`], the given
/// common name, and both client and server authentication (every node is both). Public so that
/// tests and tools can issue node certificates from a CA with the same parameters.
pub fn node_certificate_params(common_name: &str) -> Result<rcgen::CertificateParams> {
    let mut params =
        rcgen::CertificateParams::new(vec![CERTIFICATE_NAME.to_owned()]).map_err(rcgen_error)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn rcgen_error(error: rcgen::Error) -> Error {
    Error::Tls {
        context: "generating the node certificate",
        reason: error.to_string(),
    }
}

fn corrupt(path: &Path, reason: &str) -> Error {
    Error::CorruptIdentity {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Whether `key` is the private key of the chain's first certificate.
fn check_key_matches(
    certificate_chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> std::result::Result<(), String> {
    if certificate_chain.is_empty() {
        return Err("no certificate".into());
    }
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certificate_chain.to_vec(), key.clone_key(), &provider)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A certificate chain (PEM, its own certificate first) and the key that goes with it, read
/// with `read` (which says what a missing file means).
fn read_certificate_and_key(
    certificate_path: &Path,
    key_path: &Path,
    read: fn(&Path) -> Result<Vec<u8>>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let pem_bytes = read(certificate_path)?;
    let certificate_chain = CertificateDer::pem_slice_iter(&pem_bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| corrupt(certificate_path, &format!("not PEM certificates: {e}")))?;
    if certificate_chain.is_empty() {
        return Err(corrupt(certificate_path, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_path)?)
        .map_err(|e| corrupt(key_path, &format!("not a PEM private key: {e}")))?;
    check_key_matches(&certificate_chain, &key).map_err(|reason| {
        let certificate = certificate_path.file_name().unwrap_or_default().display();
        corrupt(key_path, &format!("does not match {certificate}: {reason}"))
    })?;
    Ok((certificate_chain, key))
}

/// Writes a key and its certificate chain (PEM), each file atomically, the key first: a
/// certificate file marks a complete pair. Creates the directory if missing.
fn write_certificate_and_key(
    certificate_path: &Path,
    key_path: &Path,
    certificate_chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<()> {
    let dir = certificate_path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), &e))?;
    write_atomically(
        key_path,
        pem("PRIVATE KEY", key.secret_der()).as_bytes(),
        true,
    )?;
    let certificates: String = certificate_chain
        .iter()
        .map(|certificate| pem("CERTIFICATE", certificate))
        .collect();
    write_atomically(certificate_path, certificates.as_bytes(), false)
}

/// A PEM file of at most [`IDENTITY_FILE_BYTES_MAX`]; missing is an I/O error (not corrupt).
fn read_pem_file(path: &Path) -> Result<Vec<u8>> {
    match read_identity_file(path) {
        Err(Error::CorruptIdentity { .. }) if !path.exists() => Err(Error::Io {
            context: format!("opening {}", path.display()),
            kind: std::io::ErrorKind::NotFound,
            message: "not found".into(),
        }),
        other => other,
    }
}

fn read_identity_file(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => corrupt(path, "missing (broker-id exists)"),
        _ => Error::io(format!("opening {}", path.display()), &e),
    })?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, IDENTITY_FILE_BYTES_MAX + 1),
        &mut bytes,
    )
    .map_err(|e| Error::io(format!("reading {}", path.display()), &e))?;
    if bytes.len() as u64 > IDENTITY_FILE_BYTES_MAX {
        return Err(corrupt(
            path,
            &format!("larger than {IDENTITY_FILE_BYTES_MAX} bytes"),
        ));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it, synced, renamed
/// over `path`, and the directory synced so the rename survives a crash.
fn write_atomically(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp: PathBuf = dir.join(format!(".{file_name}.tmp"));
    let context = |what: &str| format!("{what} {}", temp.display());
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(&temp)
        .map_err(|e| Error::io(context("creating"), &e))?;
    file.write_all(bytes)
        .map_err(|e| Error::io(context("writing"), &e))?;
    file.sync_all()
        .map_err(|e| Error::io(context("syncing"), &e))?;
    drop(file);
    fs::rename(&temp, path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", temp.display(), path.display()),
            &e,
        )
    })?;
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), &e))?;
    Ok(())
}

/// PEM armour around DER bytes, 64 base64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_like_the_rfc() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn a_fingerprint_prints_and_parses_as_64_hex_digits() {
        let fingerprint = Fingerprint::of(b"certificate");
        let text = fingerprint.to_string();
        assert_eq!(text.len(), 64);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fingerprint);
        assert_eq!(
            text.to_uppercase().parse::<Fingerprint>().unwrap(),
            fingerprint
        );
        assert!(text[..62].parse::<Fingerprint>().is_err());
        assert!(format!("{}zz", &text[..62]).parse::<Fingerprint>().is_err());
    }
}
