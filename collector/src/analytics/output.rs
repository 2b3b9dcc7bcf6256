//! Answers: rows with ordered columns, as JSON or CSV.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// One row: group keys first, then the metric's fields, in the order they are printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row(pub Vec<(&'static str, Value)>);

impl Row {
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Row {
        self.0.push((key, value.into()));
        self
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn to_value(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A metric's answer.
#[derive(Debug, serde::Serialize)]
pub struct Answer {
    pub metric: &'static str,
    pub from: String,
    pub to: String,
    pub at: String,
    pub by: Option<&'static str>,
    pub rows: Vec<Row>,
}

/// A ratio, `null` over a zero denominator.
pub fn ratio(num: f64, den: f64) -> Value {
    if den == 0.0 {
        Value::Null
    } else {
        num_value(num / den)
    }
}

/// A float as a JSON number (non-finite values cannot occur from finite inputs; `null` if so).
pub fn num_value(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn csv_cell(v: &Value, out: &mut String) {
    let text = match v {
        Value::Null => return,
        Value::String(s) => s.clone(),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(_) | Value::Object(_) => v.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(&text);
    }
}

/// RFC 4180 CSV: a header naming the columns, then one line per row. Columns are the union of
/// the rows' keys in first-seen order (every row of one answer has the same keys).
pub fn to_csv(rows: &[Row], header_if_empty: &[&str]) -> String {
    let mut cols: Vec<&str> = Vec::new();
    for r in rows {
        for (k, _) in &r.0 {
            if !cols.contains(k) {
                cols.push(k);
            }
        }
    }
    if cols.is_empty() {
        cols = header_if_empty.to_vec();
    }
    let mut out = String::new();
    out.push_str(&cols.join(","));
    out.push_str("\r\n");
    for r in rows {
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if let Some(v) = r.get(c) {
                csv_cell(v, &mut out);
            }
        }
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it_and_leaves_nulls_empty() {
        let rows = vec![
            Row::default()
                .with("plan", "a,b")
                .with("rate", Value::Null)
                .with("by_result", serde_json::json!({"expired": 2})),
            Row::default()
                .with("plan", "x\"y")
                .with("rate", 0.5)
                .with("by_result", serde_json::json!({})),
        ];
        assert_eq!(
            to_csv(&rows, &[]),
            "plan,rate,by_result\r\n\"a,b\",,\"{\"\"expired\"\":2}\"\r\n\"x\"\"y\",0.5,{}\r\n"
        );
        assert_eq!(to_csv(&[], &["day", "validations"]), "day,validations\r\n");
    }
}
