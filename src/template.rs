//! `{name}` placeholders in argument and prompt templates, expanded in one pass: text that comes in through a
//! placeholder (an issue body, a prompt) is never expanded again.

/// Replaces `{name}` with `lookup(name)`; names `lookup` does not know stay as they are.
pub fn expand(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}').and_then(|close| lookup(&after[..close]).map(|v| (close, v))) {
            Some((close, value)) => {
                out.push_str(&value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn expands_once_and_keeps_unknown_names() {
        let out = super::expand("a {x} {y} {", |n| (n == "x").then(|| "{y}".to_string()));
        assert_eq!(out, "a {y} {y} {");
    }
}
