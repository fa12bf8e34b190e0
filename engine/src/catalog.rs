//! The catalog: message types, contracts, queues and services, with Service Broker's rules for
//! creating and dropping them. Changes are made on a copy inside a transaction and become the
//! catalog at commit (see `transaction`); this module only knows the objects and their rules.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};

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
