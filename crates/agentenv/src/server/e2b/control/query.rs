//! Query strings of the list endpoints, parsed as the SDK encodes them, and
//! the pagination they share (`limit`, `nextToken` / `x-next-token`).

use std::collections::BTreeMap;

use super::E2bError;

/// Largest `limit` a list accepts (and its default).
pub const MAX_LIMIT: usize = 1000;
/// `limit` when none is given.
pub const DEFAULT_LIMIT: usize = 100;

/// The decoded `key=value` pairs of a query string.
pub fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The SDK's `metadata` filter: `urlencode({quote(k): quote(v)})`, sent as
/// one query value. Decoded once more as a query string, then each key
/// and value percent-decoded (what `quote` did).
pub fn metadata_filter(value: &str) -> Result<BTreeMap<String, String>, E2bError> {
    let mut out = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(value.as_bytes()) {
        let k = percent_encoding::percent_decode_str(&k)
            .decode_utf8()
            .map_err(|e| E2bError::bad_field("metadata", format!("a key is not UTF-8: {e}")))?;
        let v = percent_encoding::percent_decode_str(&v)
            .decode_utf8()
            .map_err(|e| E2bError::bad_field("metadata", format!("a value is not UTF-8: {e}")))?;
        if k.is_empty() {
            return Err(E2bError::bad_field("metadata", "an empty key"));
        }
        out.insert(k.into_owned(), v.into_owned());
    }
    Ok(out)
}

/// Sort order of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest first (the default).
    Asc,
    /// Newest first.
    Desc,
}

/// `order`: `asc` or `desc`.
pub fn order(value: &str) -> Result<Order, E2bError> {
    match value {
        "asc" => Ok(Order::Asc),
        "desc" => Ok(Order::Desc),
        other => Err(E2bError::bad_field(
            "order",
            format!("{other:?} is not asc or desc"),
        )),
    }
}

/// `limit`: 1 to [`MAX_LIMIT`].
pub fn limit(value: &str) -> Result<usize, E2bError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(E2bError::bad_field(
            "limit",
            format!("{value:?} is not a number from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// Where a page starts: after the item of this key (`nextToken`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// Unix ms the item was made.
    pub at_ms: u64,
    /// Its id.
    pub id: String,
}

impl Cursor {
    /// The token of this cursor.
    pub fn token(&self) -> String {
        format!("{}_{}", self.at_ms, self.id)
    }

    /// The cursor of a `nextToken`.
    pub fn parse(token: &str) -> Result<Cursor, E2bError> {
        let bad = || {
            E2bError::bad_field(
                "nextToken",
                format!("{token:?} is not a token this server gave"),
            )
        };
        let (at, id) = token.split_once('_').ok_or_else(bad)?;
        let at_ms = at.parse().map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(Cursor {
            at_ms,
            id: id.to_string(),
        })
    }
}

/// One page of `items` (each with its cursor) in `order`, starting after
/// `after`, at most `limit` long, with the token of the next page when
/// there are more.
pub fn page<T>(
    mut items: Vec<(Cursor, T)>,
    order: Order,
    after: Option<&Cursor>,
    limit: usize,
) -> (Vec<T>, Option<String>) {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    if order == Order::Desc {
        items.reverse();
    }
    if let Some(after) = after {
        items.retain(|(c, _)| match order {
            Order::Asc => c > after,
            Order::Desc => c < after,
        });
    }
    let more = items.len() > limit;
    items.truncate(limit);
    let next = more.then(|| items.last().map(|(c, _)| c.token())).flatten();
    (items.into_iter().map(|(_, t)| t).collect(), next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_as_the_sdk_sends_it() {
        // Python: urlencode({quote("user id"): quote("a&b=c d")}), then the
        // whole string as the value of `metadata` (decoded once by `pairs`).
        let q = pairs(Some("metadata=user%2520id%3Da%2526b%253Dc%2520d%26k%3Dv"));
        assert_eq!(q[0].0, "metadata");
        let m = metadata_filter(&q[0].1).unwrap();
        assert_eq!(m["user id"], "a&b=c d");
        assert_eq!(m["k"], "v");
        assert!(metadata_filter("=x").is_err());
    }

    #[test]
    fn pages() {
        let items: Vec<(Cursor, u32)> = (0..5)
            .map(|i| {
                (
                    Cursor {
                        at_ms: 10 * u64::from(i),
                        id: format!("i{i}"),
                    },
                    i,
                )
            })
            .collect();
        let (p1, t1) = page(items.clone(), Order::Asc, None, 2);
        assert_eq!(p1, vec![0, 1]);
        let c1 = Cursor::parse(&t1.unwrap()).unwrap();
        let (p2, t2) = page(items.clone(), Order::Asc, Some(&c1), 2);
        assert_eq!(p2, vec![2, 3]);
        let c2 = Cursor::parse(&t2.unwrap()).unwrap();
        let (p3, t3) = page(items.clone(), Order::Asc, Some(&c2), 2);
        assert_eq!((p3, t3), (vec![4], None));
        let (d, _) = page(items, Order::Desc, None, 3);
        assert_eq!(d, vec![4, 3, 2]);
        assert!(Cursor::parse("x").is_err());
        assert!(limit("0").is_err() && limit("1001").is_err() && limit("5").is_ok());
    }
}
