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
    match_rest(Some(pattern), Some(address))
}

/// True when every address `filter` matches, `pattern` matches too (a
/// rule on `a/#` covers a subscription to `a/+/c`; one on `a/+` does not
/// cover `a/#`). For an address without wildcards this is [`matches`].
pub fn covers(pattern: &str, filter: &str) -> bool {
    cover_rest(Some(pattern), Some(filter))
}

fn cover_rest(p: Option<&str>, f: Option<&str>) -> bool {
    let Some(p) = p else {
        return f.is_none();
    };
    let (tok, p_rest) = split(p);
    if tok == "#" {
        return cover_rest(p_rest, f) || f.is_some_and(|f| cover_rest(Some(p), split(f).1));
    }
    let Some(f) = f else {
        return false;
    };
    let (ft, f_rest) = split(f);
    let one = match tok {
        // One token of any kind, but not `#` (which may be many).
        "+" | "*" => ft != "#",
        _ => ft == tok,
    };
    one && cover_rest(p_rest, f_rest)
}

/// True when some address matches both `a` and `b` (a subscription to
/// `#` or `+/temp` takes messages of a topic declared as `sensors/#`).
pub fn overlaps(a: &str, b: &str) -> bool {
    overlap_rest(Some(a), Some(b))
}

fn overlap_rest(a: Option<&str>, b: Option<&str>) -> bool {
    match (a.map(split), b.map(split)) {
        (None, None) => true,
        (Some(("#", _)), _) | (_, Some(("#", _))) => true,
        (None, _) | (_, None) => false,
        (Some((x, a_rest)), Some((y, b_rest))) => {
            let one = x == y || matches!(x, "+" | "*") || matches!(y, "+" | "*");
            one && overlap_rest(a_rest, b_rest)
        }
    }
}

/// True when `topic` matches MQTT topic filter `filter` under the core
/// pattern syntax, with MQTT's rule for `$` topics (§4.7.2): a filter that
/// starts with a wildcard does not match a topic that starts with `$`.
pub fn matches_topic(filter: &str, topic: &str) -> bool {
    let wild_first = matches!(first_token(filter), "#" | "+" | "*");
    !(wild_first && topic.starts_with('$')) && matches(filter, topic)
}

fn first_token(s: &str) -> &str {
    split(s).0
}

/// The first token and what follows its separator (`None`: no more tokens).
fn split(s: &str) -> (&str, Option<&str>) {
    match s.find(['/', '.']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Matches the tokens left of a pattern against those left of an address,
/// without allocating (`None`: no tokens left).
fn match_rest(p: Option<&str>, a: Option<&str>) -> bool {
    let Some(p) = p else {
        return a.is_none();
    };
    let (tok, p_rest) = split(p);
    if tok == "#" {
        // `#` takes zero tokens, or one and stays.
        return match_rest(p_rest, a) || a.is_some_and(|a| match_rest(Some(p), split(a).1));
    }
    let Some(a) = a else {
        return false;
    };
    let (at, a_rest) = split(a);
    (tok == "+" || tok == "*" || tok == at) && match_rest(p_rest, a_rest)
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
        assert!(matches("a/+/#", "a/b"));
        assert!(!matches("a/+/#", "a"));
        assert!(matches("+", ""));
        assert!(!matches("a/+", "a"));
        assert!(matches("a//c", "a//c"));
        assert!(matches("a/+/c", "a//c"));
    }

    #[test]
    fn a_pattern_covers_narrower_filters_only() {
        assert!(covers("#", "a/+/c"));
        assert!(covers("a/#", "a/+/#"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+/c", "a/+/#"));
        assert!(covers("a/#", "a"));
        assert!(covers("orders", "orders"));
    }

    #[test]
    fn mqtt_dollar_topics_escape_leading_wildcards() {
        assert!(!matches_topic("#", "$SYS/x"));
        assert!(!matches_topic("+/x", "$SYS/x"));
        assert!(matches_topic("$SYS/#", "$SYS/x"));
        assert!(matches_topic("a/#", "a/$b"));
    }

    proptest! {
        #[test]
        fn literal_matches_itself(s in "[a-z]{1,4}([/.][a-z]{1,4}){0,4}") {
            prop_assert!(matches(&s, &s));
            prop_assert!(matches("#", &s));
        }

        /// The allocation-free matcher agrees with a plain token matcher.
        #[test]
        fn agrees_with_token_matching(
            p in "([a-c+#]|[a-c]{2})([/.]([a-c+#]|[a-c]{2})){0,4}",
            a in "[a-c]{0,2}([/.][a-c]{0,2}){0,4}",
        ) {
            fn reference(p: &[&str], a: &[&str]) -> bool {
                match p.split_first() {
                    None => a.is_empty(),
                    Some((&"#", rest)) => (0..=a.len()).any(|i| reference(rest, &a[i..])),
                    Some((&t, rest)) => a.split_first().is_some_and(|(&at, arest)| {
                        (t == "+" || t == at) && reference(rest, arest)
                    }),
                }
            }
            let pt: Vec<&str> = p.split(['/', '.']).collect();
            let at: Vec<&str> = a.split(['/', '.']).collect();
            prop_assert_eq!(matches(&p, &a), reference(&pt, &at));
            // On addresses without wildcards, covering is matching.
            prop_assert_eq!(covers(&p, &a), matches(&p, &a));
        }

        /// What a filter matches, a pattern that covers it matches too.
        #[test]
        fn covering_is_sound(
            p in "[a-b+#]([/][a-b+#]){0,3}",
            f in "[a-b+#]([/][a-b+#]){0,3}",
            a in "[a-b]([/][a-b]){0,4}",
        ) {
            if covers(&p, &f) && matches(&f, &a) {
                prop_assert!(matches(&p, &a));
            }
        }

        /// An address both match is an overlap.
        #[test]
        fn overlapping_is_sound(
            p in "[a-b+#]([/][a-b+#]){0,3}",
            f in "[a-b+#]([/][a-b+#]){0,3}",
            a in "[a-b]([/][a-b]){0,4}",
        ) {
            if matches(&p, &a) && matches(&f, &a) {
                prop_assert!(overlaps(&p, &f));
            }
        }
    }

    #[test]
    fn overlaps_of_filters_and_declared_topics() {
        assert!(overlaps("#", "sensors/#"));
        assert!(overlaps("+/temp", "sensors/#"));
        assert!(overlaps("sensors", "sensors/#"));
        assert!(!overlaps("other/#", "sensors/#"));
        assert!(!overlaps("+/+/+", "a/b"));
    }
}
