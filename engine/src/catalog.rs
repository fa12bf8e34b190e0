//! The catalog: message types, contracts, queues and services, with Service Broker's rules for
//! creating and dropping them. Changes are made on a copy inside a transaction and become the
//! catalog at commit (see `transaction`); this module only knows the objects and their rules.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::ids::BrokerInstanceId;

/// Name of the built-in message type (validation NONE) and contract (DEFAULT sent by ANY).
pub const DEFAULT: &str = "DEFAULT";
/// Longest name of any catalog object, in bytes (Service Broker: 128 characters).
pub const NAME_BYTES_MAX: usize = 128;

/// How a message type's bodies are checked when sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Anything, including an empty body.
    None,
    /// The body must be empty.
    Empty,
    /// The body must be valid UTF-8.
    Utf8,
    /// The body must be one JSON value.
    Json,
    /// The body must be a well-formed XML document.
    WellFormedXml,
}

impl Validation {
    pub fn name(self) -> &'static str {
        match self {
            Validation::None => "NONE",
            Validation::Empty => "EMPTY",
            Validation::Utf8 => "UTF8",
            Validation::Json => "JSON",
            Validation::WellFormedXml => "WELL_FORMED_XML",
        }
    }

    /// Checks `body`; the error says why it fails.
    pub fn check(self, message_type: &str, body: &[u8]) -> Result<()> {
        let fail = |reason: String| Error::ValidationFailed {
            message_type: message_type.to_owned(),
            validation: self.name(),
            reason,
        };
        match self {
            Validation::None => Ok(()),
            Validation::Empty if body.is_empty() => Ok(()),
            Validation::Empty => Err(fail(format!("body has {} bytes", body.len()))),
            Validation::Utf8 => std::str::from_utf8(body)
                .map(|_| ())
                .map_err(|e| fail(e.to_string())),
            Validation::Json => serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .map(|_| ())
                .map_err(|e| fail(e.to_string())),
            Validation::WellFormedXml => {
                let text = std::str::from_utf8(body).map_err(|e| fail(e.to_string()))?;
                roxmltree::Document::parse(text)
                    .map(|_| ())
                    .map_err(|e| fail(e.to_string()))
            }
        }
    }
}

/// Which side of a conversation may send a message type on a contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentBy {
    Initiator,
    Target,
    Any,
}

impl SentBy {
    pub fn allows(self, initiator: bool) -> bool {
        match self {
            SentBy::Any => true,
            SentBy::Initiator => initiator,
            SentBy::Target => !initiator,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageType {
    pub name: String,
    pub validation: Validation,
}

/// An immutable set of (message type, sent by) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    pub name: String,
    pub messages: BTreeMap<String, SentBy>,
}

/// Options of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// STATUS: when off, nothing can be received from the queue.
    pub enabled: bool,
    /// RETENTION: keep received and sent messages until the conversation ends (issue 4).
    pub retention: bool,
    /// POISON_MESSAGE_HANDLING: disable the queue after five rollbacks in a row (issue 4).
    pub poison_message_handling: bool,
}

impl Default for QueueOptions {
    fn default() -> QueueOptions {
        QueueOptions {
            enabled: true,
            retention: false,
            poison_message_handling: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDef {
    pub name: String,
    pub options: QueueOptions,
}

/// A named address bound to one queue, accepting the listed contracts as a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub queue: String,
    /// Contracts this service accepts as a target; empty means initiate-only.
    pub contracts: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub message_types: BTreeMap<String, MessageType>,
    pub contracts: BTreeMap<String, Contract>,
    pub queues: BTreeMap<String, QueueDef>,
    pub services: BTreeMap<String, Service>,
    pub priorities: BTreeMap<String, BrokerPriority>,
    pub routes: BTreeMap<String, Route>,
}

/// CREATE ROUTE: where messages for a service go (Service Broker's `sys.routes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// SERVICE_NAME: the service this route leads to; `None` is a wildcard (any service).
    pub service_name: Option<String>,
    /// BROKER_INSTANCE: the broker hosting it, if the route names one.
    pub broker_instance: Option<BrokerInstanceId>,
    pub address: RouteAddress,
    /// LIFETIME: ignored from this time on (milliseconds since the UNIX epoch).
    pub expires_at_ms: Option<u64>,
}

/// A route's ADDRESS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAddress {
    /// This broker.
    Local,
    /// A node, `quic://host:port` (`tcp://host:port`, Service Broker's form, means the same).
    Quic { host: String, port: u16 },
}

impl RouteAddress {
    /// Parses `LOCAL`, `quic://host:port` or `tcp://host:port` (case-insensitive scheme).
    pub fn parse(text: &str) -> Result<RouteAddress> {
        let bad = |reason: &str| Error::InvalidRoute {
            address: text.to_owned(),
            reason: reason.to_owned(),
        };
        if text.eq_ignore_ascii_case("LOCAL") {
            return Ok(RouteAddress::Local);
        }
        let lower = text.to_ascii_lowercase();
        let rest = ["quic://", "tcp://"]
            .iter()
            .find_map(|scheme| lower.starts_with(scheme).then(|| &text[scheme.len()..]))
            .ok_or_else(|| bad("expected LOCAL, quic://host:port or tcp://host:port"))?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("no port after the host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(bad("empty or malformed host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be 1..65535"))?;
        Ok(RouteAddress::Quic {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for RouteAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteAddress::Local => f.write_str("LOCAL"),
            RouteAddress::Quic { host, port } if host.contains(':') => {
                write!(f, "quic://[{host}]:{port}")
            }
            RouteAddress::Quic { host, port } => write!(f, "quic://{host}:{port}"),
        }
    }
}

/// Whether the conversation a route is chosen for is new or established (its far side has taken
/// part: see `Endpoint::established`). Expired routes are ignored for new conversations only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationStage {
    New,
    Established,
}

/// Where a message for a service goes, by Service Broker's routing rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChoice {
    /// A local service.
    Local,
    /// A node, through this route (which may name the broker instance).
    Remote {
        route: String,
        address: RouteAddress,
        broker_instance: Option<BrokerInstanceId>,
    },
    /// No route (yet): the message waits in the transmission queue; not an error.
    NoRoute,
}

/// Lowest, default and highest conversation priority.
pub const PRIORITY_LEVEL_MIN: u8 = 1;
pub const PRIORITY_LEVEL_DEFAULT: u8 = 5;
pub const PRIORITY_LEVEL_MAX: u8 = 10;

/// CREATE BROKER PRIORITY: conversations whose contract, local service and remote service
/// match (`None` stands for ANY) get priority `level` (1..=10) when their endpoint is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerPriority {
    pub name: String,
    pub contract: Option<String>,
    pub local_service: Option<String>,
    pub remote_service: Option<String>,
    pub level: u8,
}

impl Default for Catalog {
    /// A catalog holding only the built-ins: the DEFAULT message type and contract.
    fn default() -> Catalog {
        let mut catalog = Catalog {
            message_types: BTreeMap::new(),
            contracts: BTreeMap::new(),
            queues: BTreeMap::new(),
            services: BTreeMap::new(),
            priorities: BTreeMap::new(),
            routes: BTreeMap::new(),
        };
        catalog.message_types.insert(
            DEFAULT.into(),
            MessageType {
                name: DEFAULT.into(),
                validation: Validation::None,
            },
        );
        catalog.contracts.insert(
            DEFAULT.into(),
            Contract {
                name: DEFAULT.into(),
                messages: BTreeMap::from([(DEFAULT.to_owned(), SentBy::Any)]),
            },
        );
        catalog
    }
}

fn check_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| Error::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(invalid(&format!("longer than {NAME_BYTES_MAX} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("contains a control character"));
    }
    Ok(())
}

fn exists(kind: &'static str, name: &str) -> Error {
    Error::AlreadyExists {
        kind,
        name: name.to_owned(),
    }
}

fn in_use(kind: &'static str, name: &str, reason: String) -> Error {
    Error::InUse {
        kind,
        name: name.to_owned(),
        reason,
    }
}

impl Catalog {
    pub fn message_type(&self, name: &str) -> Result<&MessageType> {
        self.message_types
            .get(name)
            .ok_or_else(|| Error::UnknownMessageType(name.to_owned()))
    }

    pub fn contract(&self, name: &str) -> Result<&Contract> {
        self.contracts
            .get(name)
            .ok_or_else(|| Error::UnknownContract(name.to_owned()))
    }

    pub fn queue(&self, name: &str) -> Result<&QueueDef> {
        self.queues
            .get(name)
            .ok_or_else(|| Error::UnknownQueue(name.to_owned()))
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .get(name)
            .ok_or_else(|| Error::UnknownService(name.to_owned()))
    }

    pub fn create_message_type(&mut self, name: &str, validation: Validation) -> Result<()> {
        check_name(name)?;
        if name.starts_with(crate::system::RESERVED_PREFIX) {
            return Err(Error::InvalidName {
                name: name.into(),
                reason: "names under the Service Broker schema are the broker's own".into(),
            });
        }
        if self.message_types.contains_key(name) {
            return Err(exists("message type", name));
        }
        self.message_types.insert(
            name.into(),
            MessageType {
                name: name.into(),
                validation,
            },
        );
        Ok(())
    }

    pub fn drop_message_type(&mut self, name: &str) -> Result<()> {
        self.message_type(name)?;
        if name == DEFAULT {
            return Err(in_use("message type", name, "it is built in".into()));
        }
        if let Some(contract) = self
            .contracts
            .values()
            .find(|c| c.messages.contains_key(name))
        {
            return Err(in_use(
                "message type",
                name,
                format!("contract {:?} lists it", contract.name),
            ));
        }
        self.message_types.remove(name);
        Ok(())
    }

    pub fn create_contract(&mut self, name: &str, messages: &[(&str, SentBy)]) -> Result<()> {
        check_name(name)?;
        let invalid = |reason: String| Error::InvalidContract {
            contract: name.to_owned(),
            reason,
        };
        if name == "ANY" {
            return Err(invalid("ANY is reserved for broker priorities".into()));
        }
        if self.contracts.contains_key(name) {
            return Err(exists("contract", name));
        }
        let mut map = BTreeMap::new();
        for (message_type, sent_by) in messages {
            self.message_type(message_type)?;
            if map.insert((*message_type).to_owned(), *sent_by).is_some() {
                return Err(invalid(format!(
                    "message type {message_type:?} listed twice"
                )));
            }
        }
        if !map.values().any(|s| s.allows(true)) {
            return Err(invalid(
                "it needs at least one message type sent by INITIATOR or ANY".into(),
            ));
        }
        self.contracts.insert(
            name.into(),
            Contract {
                name: name.into(),
                messages: map,
            },
        );
        Ok(())
    }

    pub fn drop_contract(&mut self, name: &str) -> Result<()> {
        self.contract(name)?;
        if name == DEFAULT {
            return Err(in_use("contract", name, "it is built in".into()));
        }
        if let Some(service) = self.services.values().find(|s| s.contracts.contains(name)) {
            return Err(in_use(
                "contract",
                name,
                format!("service {:?} accepts it", service.name),
            ));
        }
        self.contracts.remove(name);
        Ok(())
    }

    pub fn create_queue(&mut self, name: &str, options: QueueOptions) -> Result<()> {
        check_name(name)?;
        if name.starts_with('#') {
            return Err(Error::InvalidName {
                name: name.into(),
                reason: "queue names may not start with '#'".into(),
            });
        }
        if self.queues.contains_key(name) {
            return Err(exists("queue", name));
        }
        self.queues.insert(
            name.into(),
            QueueDef {
                name: name.into(),
                options,
            },
        );
        Ok(())
    }

    pub fn alter_queue(&mut self, name: &str, options: QueueOptions) -> Result<()> {
        self.queues
            .get_mut(name)
            .ok_or_else(|| Error::UnknownQueue(name.to_owned()))?
            .options = options;
        Ok(())
    }

    pub fn drop_queue(&mut self, name: &str) -> Result<()> {
        self.queue(name)?;
        if let Some(service) = self.services.values().find(|s| s.queue == name) {
            return Err(in_use(
                "queue",
                name,
                format!("service {:?} is on it", service.name),
            ));
        }
        self.queues.remove(name);
        Ok(())
    }

    pub fn create_service(&mut self, name: &str, queue: &str, contracts: &[&str]) -> Result<()> {
        check_name(name)?;
        if name == "ANY" {
            return Err(Error::InvalidName {
                name: name.into(),
                reason: "ANY is reserved for broker priorities".into(),
            });
        }
        if self.services.contains_key(name) {
            return Err(exists("service", name));
        }
        self.queue(queue)?;
        let mut set = BTreeSet::new();
        for contract in contracts {
            self.contract(contract)?;
            set.insert((*contract).to_owned());
        }
        self.services.insert(
            name.into(),
            Service {
                name: name.into(),
                queue: queue.into(),
                contracts: set,
            },
        );
        Ok(())
    }

    /// Adds a broker priority. Its names need not exist (Service Broker's do not either: a
    /// remote service is only a name here).
    pub fn create_priority(&mut self, priority: BrokerPriority) -> Result<()> {
        check_name(&priority.name)?;
        if self.priorities.contains_key(&priority.name) {
            return Err(exists("broker priority", &priority.name));
        }
        if !(PRIORITY_LEVEL_MIN..=PRIORITY_LEVEL_MAX).contains(&priority.level) {
            return Err(Error::InvalidPriority {
                name: priority.name.clone(),
                level: priority.level,
            });
        }
        let same_match = self.priorities.values().find(|p| {
            p.contract == priority.contract
                && p.local_service == priority.local_service
                && p.remote_service == priority.remote_service
        });
        if let Some(other) = same_match {
            return Err(in_use(
                "conversation set",
                &priority.name,
                format!("broker priority {:?} already covers it", other.name),
            ));
        }
        self.priorities.insert(priority.name.clone(), priority);
        Ok(())
    }

    pub fn drop_priority(&mut self, name: &str) -> Result<()> {
        self.priorities
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::UnknownPriority(name.to_owned()))
    }

    /// The priority of a new endpoint: the broker priority matching best — an exact contract
    /// beats ANY, then an exact local service, then an exact remote service — or 5.
    pub fn priority_for(&self, contract: &str, local_service: &str, remote_service: &str) -> u8 {
        let matches = |wanted: &Option<String>, actual: &str| match wanted {
            None => Some(false),
            Some(w) if w == actual => Some(true),
            Some(_) => None,
        };
        self.priorities
            .values()
            .filter_map(|p| {
                Some((
                    (
                        matches(&p.contract, contract)?,
                        matches(&p.local_service, local_service)?,
                        matches(&p.remote_service, remote_service)?,
                    ),
                    p.level,
                ))
            })
            .max()
            .map_or(PRIORITY_LEVEL_DEFAULT, |(_, level)| level)
    }

    pub fn create_route(&mut self, route: Route) -> Result<()> {
        check_name(&route.name)?;
        if self.routes.contains_key(&route.name) {
            return Err(exists("route", &route.name));
        }
        self.routes.insert(route.name.clone(), route);
        Ok(())
    }

    /// ALTER ROUTE: replaces the route's settings.
    pub fn alter_route(&mut self, route: Route) -> Result<()> {
        let existing = self
            .routes
            .get_mut(&route.name)
            .ok_or_else(|| Error::UnknownRoute(route.name.clone()))?;
        *existing = route;
        Ok(())
    }

    pub fn drop_route(&mut self, name: &str) -> Result<()> {
        self.routes
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::UnknownRoute(name.to_owned()))
    }

    /// Routes a message for `service` (at `broker_instance`, if the conversation is pinned or
    /// named one) at time `now_ms`, by Service Broker's matching rules (reference §5.3): routes
    /// naming the service and that broker instance; else naming the service and no instance;
    /// else (no instance wanted) naming the service and some instance, one instance's routes
    /// only; else wildcard routes. Among the matches a LOCAL route wins if the service is here,
    /// then a network address. Expired routes are ignored for a new conversation (an established
    /// one keeps using them, as in Service Broker). A service on this broker with no route
    /// matching otherwise is local (what Service Broker's AutoCreatedLocal route does).
    pub fn route(
        &self,
        service: &str,
        broker_instance: Option<BrokerInstanceId>,
        this_broker: BrokerInstanceId,
        now_ms: u64,
        stage: ConversationStage,
    ) -> RouteChoice {
        let live: Vec<&Route> = self
            .routes
            .values()
            .filter(|r| {
                stage == ConversationStage::Established
                    || r.expires_at_ms.is_none_or(|at| at > now_ms)
            })
            .collect();
        let named = |r: &&&Route| r.service_name.as_deref() == Some(service);
        let mut matches: Vec<&Route> = Vec::new();
        if let Some(wanted) = broker_instance {
            matches = live
                .iter()
                .filter(named)
                .filter(|r| r.broker_instance == Some(wanted))
                .copied()
                .collect();
        }
        if matches.is_empty() {
            matches = live
                .iter()
                .filter(named)
                .filter(|r| r.broker_instance.is_none())
                .copied()
                .collect();
        }
        if matches.is_empty() && broker_instance.is_none() {
            let first_instance = live
                .iter()
                .filter(named)
                .filter_map(|r| r.broker_instance)
                .min();
            matches = live
                .iter()
                .filter(named)
                .filter(|r| r.broker_instance.is_some() && r.broker_instance == first_instance)
                .copied()
                .collect();
        }
        let named_match = !matches.is_empty();
        if matches.is_empty() {
            matches = live
                .iter()
                .filter(|r| r.service_name.is_none() && r.broker_instance.is_none())
                .copied()
                .collect();
        }
        // A service here is reached locally unless routes naming it lead elsewhere (when only
        // wildcards match, the implicit local route is one of them, and LOCAL is preferred).
        let here = self.services.contains_key(service)
            && broker_instance.is_none_or(|wanted| wanted == this_broker);
        if here && (!named_match || matches.iter().any(|r| r.address == RouteAddress::Local)) {
            return RouteChoice::Local;
        }
        match matches.iter().find(|r| r.address != RouteAddress::Local) {
            Some(route) => RouteChoice::Remote {
                route: route.name.clone(),
                address: route.address.clone(),
                broker_instance: route.broker_instance.or(broker_instance),
            },
            None => RouteChoice::NoRoute,
        }
    }

    /// Removes a service. The caller checks for conversations still using it (the catalog does
    /// not know conversations).
    pub fn drop_service(&mut self, name: &str) -> Result<()> {
        self.service(name)?;
        self.services.remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validations_accept_and_refuse() {
        assert!(Validation::None.check("t", b"\xff\x00").is_ok());
        assert!(Validation::Empty.check("t", b"").is_ok());
        assert!(Validation::Empty.check("t", b"x").is_err());
        assert!(Validation::Utf8.check("t", "héllo".as_bytes()).is_ok());
        assert!(Validation::Utf8.check("t", b"\xff").is_err());
        assert!(Validation::Json.check("t", br#"{"a": [1, 2]}"#).is_ok());
        assert!(Validation::Json.check("t", br#"{"a": "#).is_err());
        assert!(Validation::WellFormedXml.check("t", b"<a><b/></a>").is_ok());
        assert!(Validation::WellFormedXml.check("t", b"<a><b></a>").is_err());
    }

    #[test]
    fn contract_needs_an_initiator_message_and_known_types() {
        let mut c = Catalog::default();
        c.create_message_type("//t/Reply", Validation::None)
            .unwrap();
        assert!(matches!(
            c.create_contract("//c", &[("//t/Reply", SentBy::Target)]),
            Err(Error::InvalidContract { .. })
        ));
        assert!(matches!(
            c.create_contract("//c", &[("//t/Nope", SentBy::Any)]),
            Err(Error::UnknownMessageType(_))
        ));
        c.create_contract("//c", &[("//t/Reply", SentBy::Any)])
            .unwrap();
        assert!(matches!(
            c.drop_message_type("//t/Reply"),
            Err(Error::InUse { .. })
        ));
    }

    #[test]
    fn queues_and_services_keep_their_references() {
        let mut c = Catalog::default();
        c.create_queue("Q", QueueOptions::default()).unwrap();
        assert!(matches!(
            c.create_queue("#Q", QueueOptions::default()),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            c.create_service("//s", "Nope", &[]),
            Err(Error::UnknownQueue(_))
        ));
        c.create_service("//s", "Q", &[DEFAULT]).unwrap();
        assert!(matches!(c.drop_queue("Q"), Err(Error::InUse { .. })));
        assert!(matches!(c.drop_contract(DEFAULT), Err(Error::InUse { .. })));
        c.drop_service("//s").unwrap();
        c.drop_queue("Q").unwrap();
    }

    #[test]
    fn routes_match_by_name_then_instance_then_wildcard_and_expire() {
        use ConversationStage::{Established, New};
        let mut c = Catalog::default();
        let this = BrokerInstanceId(1);
        let far = BrokerInstanceId(2);
        let route = |name: &str, service: Option<&str>, instance, address: &str| Route {
            name: name.into(),
            service_name: service.map(Into::into),
            broker_instance: instance,
            address: RouteAddress::parse(address).unwrap(),
            expires_at_ms: None,
        };
        assert_eq!(c.route("//far", None, this, 0, New), RouteChoice::NoRoute);
        c.create_route(route("any", None, None, "quic://hub:4022"))
            .unwrap();
        let remote = |route: &str, host: &str, instance| RouteChoice::Remote {
            route: route.into(),
            address: RouteAddress::Quic {
                host: host.into(),
                port: 4022,
            },
            broker_instance: instance,
        };
        assert_eq!(
            c.route("//far", None, this, 0, New),
            remote("any", "hub", None)
        );
        c.create_route(route("pinned", Some("//far"), Some(far), "TCP://b:4022"))
            .unwrap();
        assert_eq!(
            c.route("//far", None, this, 0, New),
            remote("pinned", "b", Some(far)),
            "a route naming the service beats the wildcard"
        );
        c.create_route(route("named", Some("//far"), None, "quic://a:4022"))
            .unwrap();
        assert_eq!(
            c.route("//far", None, this, 0, New),
            remote("named", "a", None)
        );
        assert_eq!(
            c.route("//far", Some(far), this, 0, New),
            remote("pinned", "b", Some(far)),
            "the conversation's instance first"
        );
        c.alter_route(Route {
            expires_at_ms: Some(100),
            ..route("named", Some("//far"), None, "quic://a:4022")
        })
        .unwrap();
        assert_eq!(
            c.route("//far", None, this, 99, New),
            remote("named", "a", None)
        );
        assert_eq!(
            c.route("//far", None, this, 100, New),
            remote("pinned", "b", Some(far)),
            "an expired route is ignored for a new conversation"
        );
        assert_eq!(
            c.route("//far", None, this, 100, Established),
            remote("named", "a", None),
            "an established conversation keeps using it"
        );
        // A local service is local unless a route naming it says otherwise.
        c.create_queue("Q", QueueOptions::default()).unwrap();
        c.create_service("//here", "Q", &[]).unwrap();
        assert_eq!(c.route("//here", None, this, 0, New), RouteChoice::Local);
        assert_eq!(
            c.route("//here", Some(far), this, 0, New),
            remote("any", "hub", Some(far)),
            "another instance's copy of the service is not here"
        );
        c.drop_route("any").unwrap();
        assert!(matches!(c.drop_route("any"), Err(Error::UnknownRoute(_))));
        for bad in [
            "quic://host",
            "quic://:1",
            "quic://h:0",
            "http://h:1",
            "quic://h:99999",
        ] {
            assert!(RouteAddress::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            RouteAddress::parse("quic://[::1]:7").unwrap().to_string(),
            "quic://[::1]:7"
        );
    }

    #[test]
    fn the_best_matching_broker_priority_wins() {
        let mut c = Catalog::default();
        let priority =
            |name: &str, contract: Option<&str>, local: Option<&str>, level| BrokerPriority {
                name: name.into(),
                contract: contract.map(Into::into),
                local_service: local.map(Into::into),
                remote_service: None,
                level,
            };
        assert_eq!(c.priority_for("//c", "//l", "//r"), PRIORITY_LEVEL_DEFAULT);
        c.create_priority(priority("any", None, None, 2)).unwrap();
        c.create_priority(priority("local", None, Some("//l"), 3))
            .unwrap();
        c.create_priority(priority("contract", Some("//c"), None, 9))
            .unwrap();
        assert_eq!(c.priority_for("//c", "//l", "//r"), 9, "contract first");
        assert_eq!(c.priority_for("//x", "//l", "//r"), 3);
        assert_eq!(c.priority_for("//x", "//y", "//r"), 2);
        assert!(matches!(
            c.create_priority(priority("dup", None, None, 4)),
            Err(Error::InUse { .. })
        ));
        assert!(matches!(
            c.create_priority(priority("high", Some("//z"), None, 11)),
            Err(Error::InvalidPriority { .. })
        ));
        c.drop_priority("contract").unwrap();
        assert_eq!(c.priority_for("//c", "//l", "//r"), 3);
        assert!(matches!(
            c.drop_priority("contract"),
            Err(Error::UnknownPriority(_))
        ));
        assert!(matches!(
            c.create_message_type(crate::system::END_DIALOG, Validation::None),
            Err(Error::InvalidName { .. })
        ));
    }
}
