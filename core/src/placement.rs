//! Which broker holds a queue or topic (DESIGN.md "Broker"): rendezvous
//! hashing over a set of brokers, so every router (and the console)
//! computes the same answer from the same set, and a broker joining takes
//! only the addresses it wins.

/// The broker of `brokers` that holds (`space`, `address`), if any.
pub fn place<'a>(
    space: &str,
    address: &str,
    brokers: impl IntoIterator<Item = &'a String>,
) -> Option<String> {
    brokers
        .into_iter()
        .max_by_key(|b| {
            (
                mix(fnv1a(&[b.as_bytes(), space.as_bytes(), address.as_bytes()])),
                *b,
            )
        })
        .cloned()
}

/// Spreads every bit of `h` over all of them (MurmurHash3's finalizer):
/// FNV-1a alone keeps names that differ in one character ordered alike
/// for most addresses (brokers `broker-0`, `broker-1`, `broker-2` got 19%,
/// 46% and 35% of them; `b1` and `b2` every one of twelve queues).
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_and_spreads() {
        let two: Vec<String> = vec!["b1".into(), "b2".into()];
        let three: Vec<String> = vec!["b1".into(), "b2".into(), "b3".into()];
        let mut on = std::collections::HashMap::new();
        let mut moved_elsewhere = 0;
        for i in 0..1000 {
            let a = format!("q{i}");
            let p2 = place("s", &a, &two).expect("brokers");
            let p3 = place("s", &a, &three).expect("brokers");
            assert_eq!(place("s", &a, two.iter().rev()).as_ref(), Some(&p2));
            // A broker joining takes addresses only for itself.
            if p3 != p2 && p3 != "b3" {
                moved_elsewhere += 1;
            }
            *on.entry(p2).or_insert(0) += 1;
        }
        assert_eq!(moved_elsewhere, 0);
        assert!(on.values().all(|n| *n > 450), "{on:?}");
        // Names alike (a StatefulSet's) and short addresses spread evenly.
        let set: Vec<String> = (0..3).map(|i| format!("broker-{i}")).collect();
        let mut on = std::collections::HashMap::new();
        for i in 0..3000 {
            *on.entry(place("default", &format!("spread{i}"), &set))
                .or_insert(0) += 1;
        }
        assert!(on.values().all(|n| (900..1100).contains(n)), "{on:?}");
        assert_eq!(place("s", "q", &Vec::<String>::new()), None);
    }
}
