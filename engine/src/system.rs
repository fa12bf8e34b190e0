//! Service Broker's system message types: what the broker itself puts in a queue. They are not
//! in the catalog (nobody may send them, create them or drop them) and every conversation may
//! receive them whatever its contract.
//!
//! RECEIVE delivers a conversation's DialogTimer messages first, then its Error messages, then
//! everything else in sequence order (EndDialog is sequenced like a user message: it comes
//! after everything the far side sent before ending).

use crate::error::{Error, Result};

/// The far side ended the conversation (plain END CONVERSATION). Empty body.
pub const END_DIALOG: &str = "http://schemas.microsoft.com/SQL/ServiceBroker/EndDialog";
/// The conversation failed: the far side ended it WITH ERROR, or the broker did (lifetime
/// expired). The body is XML, see `error_body`.
pub const ERROR: &str = "http://schemas.microsoft.com/SQL/ServiceBroker/Error";
/// This side's conversation timer fired. Empty body; never sent to the far side.
pub const DIALOG_TIMER: &str = "http://schemas.microsoft.com/SQL/ServiceBroker/DialogTimer";

/// Names under this prefix are the broker's own: a user message type may not take one.
pub const RESERVED_PREFIX: &str = "http://schemas.microsoft.com/SQL/ServiceBroker/";

/// XML namespace of an Error body.
pub const ERROR_NAMESPACE: &str = "http://schemas.microsoft.com/SQL/ServiceBroker/Error";

/// Error code of a dialog whose lifetime expired (Service Broker's −8489).
pub const ERROR_LIFETIME_EXPIRED: i32 = -8489;
const LIFETIME_EXPIRED_TEXT: &str = "The dialog has exceeded the specified LIFETIME.";

/// Longest description END CONVERSATION WITH ERROR accepts, in characters (nvarchar(3000)).
pub const ERROR_DESCRIPTION_CHARS_MAX: usize = 3000;

/// The body of an Error message:
/// `<Error xmlns="…/Error"><Code>code</Code><Description>text</Description></Error>`.
pub fn error_body(code: i32, description: &str) -> Vec<u8> {
    let mut xml = String::with_capacity(128 + description.len());
    xml.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error xmlns=\"");
    xml.push_str(ERROR_NAMESPACE);
    xml.push_str("\"><Code>");
    xml.push_str(&code.to_string());
    xml.push_str("</Code><Description>");
    for c in description.chars() {
        match c {
            '<' => xml.push_str("&lt;"),
            '>' => xml.push_str("&gt;"),
            '&' => xml.push_str("&amp;"),
            '"' => xml.push_str("&quot;"),
            '\'' => xml.push_str("&apos;"),
            c => xml.push(c),
        }
    }
    xml.push_str("</Description></Error>");
    xml.into_bytes()
}

/// The body of the Error message a dialog gets when its lifetime expires.
pub fn lifetime_expired_body() -> Vec<u8> {
    error_body(ERROR_LIFETIME_EXPIRED, LIFETIME_EXPIRED_TEXT)
}

/// Reads the code and description of an Error message body.
pub fn parse_error_body(body: &[u8]) -> Result<(i32, String)> {
    let bad = |reason: String| Error::ValidationFailed {
        message_type: ERROR.into(),
        validation: "Error body",
        reason,
    };
    let text = std::str::from_utf8(body).map_err(|e| bad(e.to_string()))?;
    let document = roxmltree::Document::parse(text).map_err(|e| bad(e.to_string()))?;
    let root = document.root_element();
    if root.tag_name().name() != "Error" {
        return Err(bad(format!(
            "root element is {:?}, not Error",
            root.tag_name().name()
        )));
    }
    let child = |name: &str| {
        root.children()
            .find(|n| n.is_element() && n.tag_name().name() == name)
            .map(|n| n.text().unwrap_or_default().to_owned())
    };
    let code = child("Code")
        .ok_or_else(|| bad("no Code element".into()))?
        .trim()
        .parse::<i32>()
        .map_err(|e| bad(format!("Code: {e}")))?;
    Ok((code, child("Description").unwrap_or_default()))
}

/// Whether `name` is one of the system message types.
pub fn is_system_message_type(name: &str) -> bool {
    name == END_DIALOG || name == ERROR || name == DIALOG_TIMER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_round_trips_with_markup_in_its_description() {
        let body = error_body(42, "bad <order> & \"worse\"");
        assert_eq!(
            parse_error_body(&body).unwrap(),
            (42, "bad <order> & \"worse\"".to_owned())
        );
        assert_eq!(
            parse_error_body(&lifetime_expired_body()).unwrap().0,
            ERROR_LIFETIME_EXPIRED
        );
        assert!(parse_error_body(b"<Other/>").is_err());
        assert!(parse_error_body(b"not xml").is_err());
    }
}
