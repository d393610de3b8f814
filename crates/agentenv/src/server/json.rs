//! Request bodies: size-limited, parsed with the failing field's path in the error.

use agentenv_api::MAX_BODY_BYTES;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::{ApiError, LimitError};
use super::limits::{is_idle_timeout, BodyTimeout};

/// A JSON body of at most [`MAX_BODY_BYTES`], parsed into `T`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        parse(&read_body(req).await?).map(JsonBody)
    }
}

/// Like [`JsonBody`], but an empty body means `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse(&bytes).map(OptionalJsonBody)
    }
}

/// The whole body, or 413 past [`MAX_BODY_BYTES`], or 408 when it does not
/// arrive whole within the body timeout (a slow client holds no task for long).
async fn read_body(req: Request) -> Result<axum::body::Bytes, ApiError> {
    let timeout = req
        .extensions()
        .get::<BodyTimeout>()
        .copied()
        .unwrap_or_default();
    let read = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(timeout.0, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Err(_) => Err(LimitError::BodyTimeout {
            timeout_ms: timeout.ms(),
        }
        .into()),
        Ok(Err(e)) if is_idle_timeout(&e) => Err(LimitError::BodyTimeout {
            timeout_ms: timeout.ms(),
        }
        .into()),
        Ok(Err(e)) if is_length_limit(&e) => Err(LimitError::BodyTooLarge {
            limit: MAX_BODY_BYTES,
        }
        .into()),
        Ok(Err(e)) => Err(ApiError::bad_field(
            None,
            format!("reading the request body failed: {e}"),
        )),
    }
}

/// True when `to_bytes` stopped at its limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Parses JSON, naming the field at fault (`disk.rootfs_id`, `slots`, …).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_field(
            None,
            "request body is empty; expected JSON",
        ));
    }
    // serde would also take an array for a struct (its fields in order); the
    // API's bodies are objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::bad_field(
            None,
            "request body must be a JSON object, not an array",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let mut path = field_path(e.path());
        let inner = e.into_inner();
        if let Some(key) = inside_tagged::<T>(bytes, &path, &inner) {
            path = format!("{path}.{key}");
        }
        // The path names the failing field, an unknown one included; at the top
        // level it is empty and the unknown field is named only in the message.
        let field = if !path.is_empty() {
            Some(path)
        } else {
            unknown_field(&inner.to_string())
        };
        let msg = match (&field, inner.classify()) {
            (_, serde_json::error::Category::Syntax | serde_json::error::Category::Eof) => {
                format!("malformed JSON: {inner}")
            }
            (Some(f), _) => format!("invalid field `{f}`: {inner}"),
            (None, _) => format!("invalid request: {inner}"),
        };
        ApiError::bad_field(field, msg)
    })?;
    // Bytes after the value (`{…} x`, two objects) are malformed too:
    // `serde_json::from_slice` checks this, a bare `Deserializer` needs `end`.
    de.end()
        .map_err(|e| ApiError::bad_field(None, format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// The path as `disk.rootfs_id`, `shares[0].host_path`, up to the first
/// position serde could not name (it shows as `?` inside a truncated object):
/// `{"disk": {` blames `disk`, `{` blames nothing.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    out
}

/// The key at fault inside a tagged object (`disk: {"kind": …}`), whose
/// errors serde reports against the object as a whole: a missing or unknown
/// key is in the message; a bad value is found by taking the object's keys
/// out one at a time until the error is no longer about that value.
fn inside_tagged<T: DeserializeOwned>(
    bytes: &[u8],
    path: &str,
    err: &serde_json::Error,
) -> Option<String> {
    /// More keys than this are not worth a parse each (the error stays on the object).
    const MAX_KEYS: usize = 16;
    if path.is_empty() || path.contains('[') {
        return None;
    }
    let mut root: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = path
        .split('.')
        .try_fold(&mut root, |v, k| v.get_mut(k))?
        .as_object()?;
    let msg = err.to_string();
    if !obj.contains_key("kind") {
        // Then the one thing it can lack is its tag.
        return msg
            .starts_with("missing field `kind`")
            .then(|| "kind".to_string());
    }
    for prefix in ["missing field `", "unknown field `"] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            return Some(rest[..rest.find('`')?].to_string());
        }
    }
    let what = without_position(&msg);
    let keys: Vec<String> = obj.keys().filter(|k| *k != "kind").cloned().collect();
    if keys.len() > MAX_KEYS {
        return None;
    }
    keys.into_iter().find(|key| {
        let mut v = root.clone();
        if let Some(o) = path
            .split('.')
            .try_fold(&mut v, |v, k| v.get_mut(k))
            .and_then(|o| o.as_object_mut())
        {
            o.remove(key);
        }
        match serde_json::from_value::<T>(v) {
            Ok(_) => true,
            Err(e) => without_position(&e.to_string()) != what,
        }
    })
}

/// A serde_json message without its ` at line L column C`.
fn without_position(msg: &str) -> &str {
    msg.rfind(" at line ").map_or(msg, |i| &msg[..i])
}

fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentenv_api::CreateVmRequest;

    fn err(body: &str) -> ApiError {
        parse::<CreateVmRequest>(body.as_bytes()).err().unwrap()
    }

    #[test]
    fn fields_are_named() {
        let e = err(r#"{"vm_id":"a","disk":{"kind":"direct","path":"/x"},"memory":1}"#);
        assert_eq!(e.body.field.as_deref(), Some("memory"));
        let e = err(r#"{"vm_id":"a","slots":"two","disk":{"kind":"direct","path":"/x"}}"#);
        assert_eq!(e.body.field.as_deref(), Some("slots"));
        assert!(e.body.error.contains("slots"), "{}", e.body.error);
        let e = err(r#"{"vm_id":7,"disk":{"kind":"direct","path":"/x"}}"#);
        assert_eq!(e.body.field.as_deref(), Some("vm_id"));
        // `disk` may be left out (a restore has none): the engine says when
        // it is missing, naming it.
        assert!(parse::<CreateVmRequest>(br#"{"vm_id":"a"}"#).is_ok());
        let e = err(r#"{"vm_id":"a","disk":{"kind":"floppy"}}"#);
        assert!(e.body.error.contains("floppy"), "{}", e.body.error);
        // Inside the tagged `disk` object, the key at fault is named too.
        for (body, field) in [
            (
                r#"{"vm_id":"a","disk":{"kind":"overlay","rootfs_id":5}}"#,
                "disk.rootfs_id",
            ),
            (
                r#"{"vm_id":"a","disk":{"kind":"overlay"}}"#,
                "disk.rootfs_id",
            ),
            (
                r#"{"vm_id":"a","disk":{"kind":"direct","path":"/x","foo":1}}"#,
                "disk.foo",
            ),
            (r#"{"vm_id":"a","disk":{"rootfs_id":"x"}}"#, "disk.kind"),
            (
                r#"{"vm_id":"a","disk":{"kind":"overlay","rootfs_id":"x","disk_size_gib":"big"}}"#,
                "disk.disk_size_gib",
            ),
            (
                r#"{"disk":{"disk_size_gib":-1,"kind":"overlay","rootfs_id":"x"},"vm_id":"a"}"#,
                "disk.disk_size_gib",
            ),
        ] {
            let e = err(body);
            assert_eq!(
                e.body.field.as_deref(),
                Some(field),
                "{body}: {}",
                e.body.error
            );
            assert!(e.body.error.contains(field), "{}", e.body.error);
        }
        let e = err(r#"{"vm_id": "a", "#);
        assert!(
            e.body.error.starts_with("malformed JSON"),
            "{}",
            e.body.error
        );
        let e = err("");
        assert!(e.body.error.contains("empty"), "{}", e.body.error);
    }
}
