//! The node's configuration file (TOML) and what applying it means: the durability and trust the
//! node starts with, and the routes it makes sure exist.
//!
//! Routes in the file are declarative: at every start each one is created if missing and
//! altered if the catalog's route of that name differs (a route with a `lifetime` is renewed:
//! it expires that many seconds after the start that applied it, as CREATE ROUTE … LIFETIME
//! counts from its own run). Routes created with T-SQL are left alone, and a route removed
//! from the file is not dropped (DROP ROUTE does that).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_engine::{Broker, BrokerInstanceId, Durability, Route, RouteAddress};
use herald_net::identity::{Fingerprint, Trust};

/// The node's configuration file.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `sync` (a commit is durable when it returns), `none` (the OS decides when), or
    /// `batched-<ms>` (synced within that many milliseconds).
    pub durability: String,
    /// Peers this node trusts (and may reach), by certificate fingerprint (SHA-256, hex).
    pub peers: Vec<PeerConfig>,
    /// PEM files of CAs whose certificates this node trusts.
    pub ca_files: Vec<PathBuf>,
    /// Routes the node creates (or alters to match) at start.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub fingerprint: String,
    /// If set, the only local services this peer may send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
}

/// A `[[routes]]` entry: CREATE ROUTE's options.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// SERVICE_NAME; absent: the route leads to any service (a wildcard route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// BROKER_INSTANCE (a GUID): the broker hosting the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_instance: Option<String>,
    /// ADDRESS: `quic://host:port`, `tcp://host:port` or `LOCAL`.
    pub address: String,
    /// LIFETIME, in seconds from the node's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./herald-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 4022)),
            durability: "sync".into(),
            peers: Vec::new(),
            ca_files: Vec::new(),
            routes: Vec::new(),
        }
    }
}

impl Config {
    /// The file at `path`, or the defaults when there is none.
    pub fn load(path: Option<&PathBuf>) -> Result<Config, String> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading configuration {}: {e}", path.display()))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| format!("configuration {}: {e}", path.display()))?;
        config
            .check()
            .map_err(|e| format!("configuration {}: {e}", path.display()))?;
        Ok(config)
    }

    /// Everything in the file that can be checked without the node's data: before the node
    /// starts (it made its identity, opened its broker and bound its port before a bad
    /// durability or a repeated route name stopped it), and for `--print-config` (which showed
    /// a file the node would refuse).
    fn check(&self) -> Result<(), String> {
        self.durability()?;
        for peer in &self.peers {
            peer.fingerprint
                .parse::<Fingerprint>()
                .map_err(|e| format!("peer fingerprint {:?}: {e}", peer.fingerprint))?;
        }
        let mut names = HashSet::new();
        for route in &self.routes {
            route.to_route(0)?;
            if !names.insert(route.name.as_str()) {
                return Err(format!("route {:?} is configured twice", route.name));
            }
        }
        Ok(())
    }

    pub fn durability(&self) -> Result<Durability, String> {
        parse_durability(&self.durability)
    }

    /// The trust list, and the peers that may reach only some services.
    pub fn trust(&self) -> Result<(Trust, HashMap<Fingerprint, HashSet<String>>), String> {
        let mut trust = Trust::new();
        let mut restricted = HashMap::new();
        for peer in &self.peers {
            let fingerprint: Fingerprint = peer
                .fingerprint
                .parse()
                .map_err(|e| format!("peer fingerprint {:?}: {e}", peer.fingerprint))?;
            trust = trust.pin(fingerprint);
            if let Some(services) = &peer.services {
                restricted.insert(fingerprint, services.iter().cloned().collect());
            }
        }
        for path in &self.ca_files {
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading CA file {}: {e}", path.display()))?;
            trust = trust
                .add_ca_pem(&pem)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        }
        Ok((trust, restricted))
    }
}

/// What applying the configured routes did, for the node's start-up report.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoutesApplied {
    pub created: usize,
    pub altered: usize,
    pub unchanged: usize,
}

/// Creates each configured route that is missing and alters each that differs, in one
/// transaction (all or none).
pub fn apply_routes(broker: &Broker, routes: &[RouteConfig]) -> Result<RoutesApplied, String> {
    let mut applied = RoutesApplied::default();
    if routes.is_empty() {
        return Ok(applied);
    }
    let now_ms = broker.clock().now_ms();
    let existing = broker.catalog().routes;
    let mut tx = broker.begin();
    for config in routes {
        let route = config.to_route(now_ms)?;
        let result = match existing.get(&route.name) {
            None => {
                applied.created += 1;
                tx.create_route(route)
            }
            Some(current) if *current == route => {
                applied.unchanged += 1;
                Ok(())
            }
            Some(_) => {
                applied.altered += 1;
                tx.alter_route(route)
            }
        };
        result.map_err(|e| format!("route {:?} from the configuration: {e}", config.name))?;
    }
    tx.commit()
        .map_err(|e| format!("committing the configured routes: {e}"))?;
    Ok(applied)
}

impl RouteConfig {
    /// The catalog route this entry asks for, applied at `now_ms` (its lifetime counts from
    /// then).
    fn to_route(&self, now_ms: u64) -> Result<Route, String> {
        let what = |e: String| format!("route {:?}: {e}", self.name);
        let address = RouteAddress::parse(&self.address).map_err(|e| what(e.to_string()))?;
        let broker_instance = match &self.broker_instance {
            None => None,
            Some(text) => Some(
                BrokerInstanceId::parse(text)
                    .ok_or_else(|| what(format!("broker_instance {text:?} is not a GUID")))?,
            ),
        };
        let expires_at_ms = match self.lifetime {
            None => None,
            Some(secs) => Some(
                Duration::from_secs(secs)
                    .as_millis()
                    .try_into()
                    .ok()
                    .and_then(|ms: u64| now_ms.checked_add(ms))
                    .ok_or_else(|| what(format!("lifetime {secs} s is too long")))?,
            ),
        };
        Ok(Route {
            name: self.name.clone(),
            service_name: self.service_name.clone(),
            broker_instance,
            address,
            expires_at_ms,
        })
    }
}

/// `sync`, `none` or `batched-<ms>`.
pub fn parse_durability(text: &str) -> Result<Durability, String> {
    match text {
        "sync" => Ok(Durability::Sync),
        "none" => Ok(Durability::None),
        other => other
            .strip_prefix("batched-")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(|ms| Durability::Batched {
                max_delay: Duration::from_millis(ms),
            })
            .ok_or_else(|| format!("durability {other:?}: expected sync, none or batched-<ms>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, address: &str, lifetime: Option<u64>) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            service_name: Some("//far/Service".into()),
            broker_instance: None,
            address: address.into(),
            lifetime,
        }
    }

    #[test]
    fn routes_are_created_then_left_alone_then_altered_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path(), herald_engine::Options::default()).unwrap();
        let routes = [route("r1", "quic://127.0.0.1:5000", None)];
        let first = apply_routes(&broker, &routes).unwrap();
        assert_eq!(first.created, 1);
        let again = apply_routes(&broker, &routes).unwrap();
        assert_eq!(again.unchanged, 1);
        let moved = [route("r1", "quic://127.0.0.1:5001", None)];
        assert_eq!(apply_routes(&broker, &moved).unwrap().altered, 1);
        let catalog = broker.catalog();
        assert_eq!(
            catalog.routes["r1"].address,
            RouteAddress::Quic {
                host: "127.0.0.1".into(),
                port: 5001
            }
        );
        assert_eq!(
            catalog.routes["r1"].service_name.as_deref(),
            Some("//far/Service")
        );
    }

    #[test]
    fn a_bad_route_is_refused_with_its_name_and_nothing_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path(), herald_engine::Options::default()).unwrap();
        let routes = [
            route("good", "quic://127.0.0.1:5000", Some(60)),
            route("bad", "http://nowhere", None),
        ];
        let error = apply_routes(&broker, &routes).unwrap_err();
        assert!(error.contains("\"bad\""), "{error}");
        assert!(broker.catalog().routes.is_empty());
    }

    #[test]
    fn a_file_the_node_would_refuse_is_refused_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herald.toml");
        let route = "[[routes]]\nname = \"r\"\naddress = \"quic://127.0.0.1:5000\"\n";
        for (text, expected) in [
            ("durability = \"fast\"\n".to_owned(), "durability"),
            (
                "[[peers]]\nfingerprint = \"ab\"\n".to_owned(),
                "peer fingerprint",
            ),
            (format!("{route}{route}"), "configured twice"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let error = Config::load(Some(&path)).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        std::fs::write(&path, route).unwrap();
        assert_eq!(Config::load(Some(&path)).unwrap().routes.len(), 1);
    }

    #[test]
    fn durability_spellings() {
        assert!(matches!(parse_durability("sync"), Ok(Durability::Sync)));
        assert!(matches!(parse_durability("none"), Ok(Durability::None)));
        assert!(matches!(
            parse_durability("batched-5"),
            Ok(Durability::Batched { max_delay }) if max_delay == Duration::from_millis(5)
        ));
        assert!(parse_durability("batched").is_err());
    }
}
