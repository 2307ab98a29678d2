//! SQL identifiers: the outbox table's name as configured (`schema.table`), and
//! quoting that follows PostgreSQL's `quote_ident`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// PostgreSQL truncates identifiers to `NAMEDATALEN - 1` bytes; we refuse instead.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// A table, schema-qualified. Parsed like SQL: unquoted parts fold to lower case,
/// double-quoted parts keep their case and may contain any character (`""` is a
/// quote). A name without a schema is in `public`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName::new(super::DEFAULT_TABLE_SCHEMA, super::DEFAULT_TABLE_NAME)
    }
}

/// `schema.table`, each part quoted only when `quote_ident` would quote it, so the
/// text is valid SQL.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.name)
        )
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TableName({self})")
    }
}

/// The text could not be read as `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name {input:?}: {reason}")]
pub struct ParseTableNameError {
    pub input: String,
    pub reason: String,
}

impl FromStr for TableName {
    type Err = ParseTableNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseTableNameError {
            input: s.to_string(),
            reason,
        };
        let mut parts = split_qualified(s).map_err(err)?;
        match parts.len() {
            1 => Ok(TableName::new("public", parts.remove(0))),
            2 => {
                let name = parts.remove(1);
                Ok(TableName::new(parts.remove(0), name))
            }
            n => Err(err(format!(
                "it has {n} dot-separated parts; write schema.table or table (the database \
                 is the one in postgres.url)"
            ))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits `a.b` into identifiers with SQL rules (see [`TableName`]).
fn split_qualified(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err("a double quote is not closed".into()),
                }
            }
            if part.is_empty() {
                return Err("a quoted name is empty".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
            if part.is_empty() {
                return Err("a name is empty; write schema.table or table".into());
            }
            if let Some(bad) = part.chars().find(|&c| !is_unquoted_char(c)) {
                return Err(format!(
                    "{bad:?} is not allowed in an unquoted name; double-quote names with \
                     other characters, like \"{}\"",
                    part.replace('"', "\"\"")
                ));
            }
            if part.starts_with(|c: char| c.is_ascii_digit() || c == '$') {
                return Err(format!(
                    "unquoted name {part:?} starts with a digit or '$'; double-quote it"
                ));
            }
            // Unquoted identifiers fold to lower case, as in SQL (ASCII only, as PostgreSQL
            // does for UTF-8 databases).
            part.make_ascii_lowercase();
        }
        if part.len() > MAX_IDENTIFIER_BYTES {
            return Err(format!(
                "{part:?} is longer than {MAX_IDENTIFIER_BYTES} bytes; PostgreSQL truncates such names"
            ));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => {
                return Err(format!(
                    "unexpected {c:?} after a quoted name; expected '.'"
                ))
            }
        }
    }
}

fn is_unquoted_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii()
}

/// Quotes `ident` the way PostgreSQL's `quote_ident` does: unchanged when it is lower
/// case letters, digits and `_` (not starting with a digit) and not a keyword that
/// needs quoting; otherwise in double quotes with `"` doubled.
pub fn quote_ident(ident: &str) -> Cow<'_, str> {
    let safe = ident.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && QUOTED_KEYWORDS.binary_search(&ident).is_err();
    if safe {
        Cow::Borrowed(ident)
    } else {
        Cow::Owned(format!("\"{}\"", ident.replace('"', "\"\"")))
    }
}

/// A SQL string literal (`'it''s'`), for SQL shown to operators and for statements
/// that cannot take parameters. Standard-conforming strings are assumed (the default
/// since PostgreSQL 9.1); a backslash makes it an `E''` literal to be safe either way.
pub fn quote_literal(text: &str) -> String {
    if text.contains('\\') {
        format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", text.replace('\'', "''"))
    }
}

/// Keywords `quote_ident` quotes: every category but unreserved (reserved,
/// column-name and type/function-name keywords), PostgreSQL 14-17, sorted.
/// Quoting a word needlessly is harmless; missing one makes invalid SQL, so words
/// added by any supported version are listed.
#[rustfmt::skip]
const QUOTED_KEYWORDS: &[&str] = &[
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric",
    "authorization", "between", "bigint", "binary", "bit", "boolean", "both", "case", "cast",
    "char", "character", "check", "coalesce", "collate", "collation", "column",
    "concurrently", "constraint", "create", "cross", "current_catalog", "current_date",
    "current_role", "current_schema", "current_time", "current_timestamp", "current_user",
    "dec", "decimal", "default", "deferrable", "desc", "distinct", "do", "else", "end",
    "except", "exists", "extract", "false", "fetch", "float", "for", "foreign", "freeze",
    "from", "full", "grant", "greatest", "group", "grouping", "having", "ilike", "in",
    "initially", "inner", "inout", "int", "integer", "intersect", "interval", "into", "is",
    "isnull", "join", "json", "json_array", "json_arrayagg", "json_exists", "json_object",
    "json_objectagg", "json_query", "json_scalar", "json_serialize", "json_table",
    "json_value", "lateral", "leading", "least", "left", "like", "limit", "localtime",
    "localtimestamp", "merge_action", "national", "natural", "nchar", "none", "normalize",
    "not", "notnull", "null", "nullif", "numeric", "offset", "on", "only", "or", "order",
    "out", "outer", "overlaps", "overlay", "placing", "position", "precision", "primary",
    "real", "references", "returning", "right", "row", "select", "session_user", "setof",
    "similar", "smallint", "some", "substring", "symmetric", "system_user", "table",
    "tablesample", "then", "time", "timestamp", "to", "trailing", "treat", "trim", "true",
    "union", "unique", "user", "using", "values", "varchar", "variadic", "verbose", "when",
    "where", "window", "with", "xmlattributes", "xmlconcat", "xmlelement", "xmlexists",
    "xmlforest", "xmlnamespaces", "xmlparse", "xmlpi", "xmlroot", "xmlserialize", "xmltable",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TableName {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn keywords_are_sorted_for_binary_search() {
        assert!(QUOTED_KEYWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn parses_plain_and_qualified_names() {
        assert_eq!(
            t("outbox_events"),
            TableName::new("public", "outbox_events")
        );
        assert_eq!(t("app.outbox"), TableName::new("app", "outbox"));
        assert_eq!(
            t("  App.Outbox_Events "),
            TableName::new("app", "outbox_events")
        );
        assert_eq!(t("x$1"), TableName::new("public", "x$1"));
        assert_eq!(TableName::default(), t("public.outbox_events"));
    }

    #[test]
    fn parses_quoted_names() {
        assert_eq!(
            t(r#""My Schema"."Out.box""#),
            TableName::new("My Schema", "Out.box")
        );
        assert_eq!(t(r#"app."we""ird""#), TableName::new("app", r#"we"ird"#));
        assert_eq!(t(r#""Select""#), TableName::new("public", "Select"));
    }

    #[test]
    fn rejects_bad_names_with_a_reason() {
        for (input, needle) in [
            ("", "empty"),
            ("a.", "empty"),
            (".a", "empty"),
            ("a.b.c", "3 dot-separated parts"),
            ("my-table", "double-quote"),
            ("1abc", "starts with a digit"),
            (r#""open"#, "not closed"),
            (r#""""#, "empty"),
            (r#""a"b"#, "after a quoted name"),
        ] {
            let err = input.parse::<TableName>().expect_err(input).to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
        let long = "a".repeat(64);
        assert!(long
            .parse::<TableName>()
            .unwrap_err()
            .to_string()
            .contains("63 bytes"));
        assert!("a".repeat(63).parse::<TableName>().is_ok());
    }

    #[test]
    fn display_quotes_like_quote_ident_and_round_trips() {
        assert_eq!(
            t("public.outbox_events").to_string(),
            "public.outbox_events"
        );
        assert_eq!(
            TableName::new("My Schema", "t").to_string(),
            r#""My Schema".t"#
        );
        assert_eq!(
            TableName::new("public", "user").to_string(),
            r#"public."user""#
        );
        assert_eq!(
            TableName::new("public", "Events").to_string(),
            r#"public."Events""#
        );
        assert_eq!(
            TableName::new("public", "a$b").to_string(),
            r#"public."a$b""#
        );
        assert_eq!(TableName::new("public", "9x").to_string(), r#"public."9x""#);
        assert_eq!(
            TableName::new("s", r#"we"ird"#).to_string(),
            r#"s."we""ird""#
        );
        for name in [
            TableName::new("My Schema", "Out.box"),
            TableName::new("public", "select"),
            TableName::new("s", r#"a"b"#),
            TableName::new("ünï", "cödé"),
        ] {
            assert_eq!(name.to_string().parse::<TableName>().unwrap(), name);
        }
    }

    #[test]
    fn quote_literal_escapes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }
}
