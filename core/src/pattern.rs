//! Address patterns (DESIGN.md "Address model"): tokens separated by `/` or
//! `.`; `+` or `*` matches exactly one token, `#` matches zero or more.

/// Splits an address or pattern into tokens on `/` and `.`.
fn tokens(s: &str) -> impl Iterator<Item = &str> + Clone {
    s.split(['/', '.'])
}

/// True when `pattern` contains a wildcard token.
pub fn is_pattern(pattern: &str) -> bool {
    tokens(pattern).any(|t| t == "+" || t == "*" || t == "#")
}

/// True when `address` matches `pattern`.
pub fn matches(pattern: &str, address: &str) -> bool {
    let p: Vec<&str> = tokens(pattern).collect();
    let a: Vec<&str> = tokens(address).collect();
    match_tokens(&p, &a)
}

fn match_tokens(p: &[&str], a: &[&str]) -> bool {
    match p.split_first() {
        None => a.is_empty(),
        Some((&"#", rest)) => {
            // `#` takes zero or more tokens: try every split point.
            (0..=a.len()).any(|i| match_tokens(rest, &a[i..]))
        }
        Some((&tok, rest)) => match a.split_first() {
            Some((&at, arest)) => {
                (tok == "+" || tok == "*" || tok == at) && match_tokens(rest, arest)
            }
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards() {
        assert!(matches("#", "a/b/c"));
        assert!(matches("#", ""));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a/+/c", "a/b/d/c"));
        assert!(matches("a/#/c", "a/b/d/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b"));
        assert!(!matches("a/#", "b"));
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders2"));
        assert!(is_pattern("a/#"));
        assert!(!is_pattern("a/b"));
    }

    proptest! {
        #[test]
        fn literal_matches_itself(s in "[a-z]{1,4}([/.][a-z]{1,4}){0,4}") {
            prop_assert!(matches(&s, &s));
            prop_assert!(matches("#", &s));
        }
    }
}
