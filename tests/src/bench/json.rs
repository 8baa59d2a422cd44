//! Just enough JSON to write the benchmark report (`target/bench/report.json`)
//! without a serializer dependency: values, escaping, indentation.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// Written with at most 3 decimals; NaN and infinities become null.
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn str(s: impl Into<String>) -> Self {
        Json::Str(s.into())
    }

    pub fn opt_num(v: Option<f64>) -> Self {
        v.map(Json::Num).unwrap_or(Json::Null)
    }

    pub fn nums(v: &[f64]) -> Self {
        Json::Arr(v.iter().map(|x| Json::Num(*x)).collect())
    }

    pub fn obj(fields: Vec<(&str, Json)>) -> Self {
        Json::Obj(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// Pretty-printed, two spaces per level, with a final newline.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = |out: &mut String, d: usize| out.extend(std::iter::repeat_n("  ", d));
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(x) if x.is_finite() => {
                let r = (x * 1000.0).round() / 1000.0;
                let _ = write!(out, "{}", if r == 0.0 { 0.0 } else { r });
            }
            Json::Num(_) => out.push_str("null"),
            Json::Str(s) => write_str(out, s),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Arr(items) if items.iter().all(|i| matches!(i, Json::Num(_) | Json::Null | Json::Bool(_))) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, depth);
                }
                out.push(']');
            }
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    pad(out, depth + 1);
                    item.write(out, depth + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(out, depth);
                out.push(']');
            }
            Json::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    pad(out, depth + 1);
                    write_str(out, k);
                    out.push_str(": ");
                    v.write(out, depth + 1);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                pad(out, depth);
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_escaped_pretty_json() {
        let v = Json::Arr(vec![Json::obj(vec![
            ("name", Json::str("a \"b\"\n\\c\u{1}")),
            ("n", Json::Num(5.0)),
            ("x", Json::Num(1.23456)),
            ("nan", Json::Num(f64::NAN)),
            ("s", Json::nums(&[1.0, 2.5])),
            ("none", Json::opt_num(None)),
            ("ok", Json::Bool(true)),
            ("e", Json::Obj(vec![])),
        ])]);
        let want = "[\n  {\n    \"name\": \"a \\\"b\\\"\\n\\\\c\\u0001\",\n    \"n\": 5,\n    \"x\": 1.235,\n    \
                    \"nan\": null,\n    \"s\": [1, 2.5],\n    \"none\": null,\n    \"ok\": true,\n    \"e\": {}\n  }\n]\n";
        assert_eq!(v.pretty(), want);
    }
}
