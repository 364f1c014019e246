//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size M in
//! which every backend owns about M/N slots, built the same way on every node from the same
//! backends, and in which removing one of N backends moves only about 1/N of the slots.

/// The smallest prime greater than `100 * backends` (at least 251): with more than 100
/// slots per backend, each backend's share of the table is within 1% of 1/N.
pub fn table_size(backends: usize) -> u32 {
    let mut m = (100 * backends as u64 + 1).max(251);
    while !is_prime(m) {
        m += 1;
    }
    m as u32
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// FNV-1a, 64-bit, with a seed folded in: stable across builds, machines and releases
/// (unlike std's hasher), which is what makes tables identical on every node.
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x100000001b3);
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // Final avalanche (murmur3 fmix64) so that similar names spread.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h
}

/// Builds the table for `names` (each backend's stable name, e.g. `10.244.1.5:8080`). Entry
/// i is the index into `names` of the backend owning slot i. Names are sorted first, so
/// the order callers pass them in does not matter.
pub fn build(names: &[String], size: u32) -> Vec<usize> {
    build_weighted(names, &[], size)
}

/// [`build`] with a weight per backend (empty: all equal): in each round of the fill a backend
/// takes turns in proportion to its weight (the heaviest one turn), so it owns about its
/// weight's share of the table; a backend of weight 0 owns nothing.
pub fn build_weighted(names: &[String], weights: &[u32], size: u32) -> Vec<usize> {
    let n = names.len();
    let weight = |i: usize| u64::from(weights.get(i).copied().unwrap_or(1));
    let m = size as usize;
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| names[*a].cmp(&names[*b]));
    let perm: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| {
            let offset = (fnv1a(0x6d61676c6576, names[i].as_bytes()) % m as u64) as usize;
            let skip = (fnv1a(0x77656972, names[i].as_bytes()) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let heaviest = (0..n).map(weight).max().unwrap_or(0);
    if heaviest == 0 {
        return Vec::new();
    }
    let mut next = vec![0usize; n];
    let mut credit = vec![0u64; n];
    let mut table = vec![usize::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (k, &(offset, skip)) in perm.iter().enumerate() {
            credit[k] += weight(order[k]);
            while credit[k] >= heaviest {
                credit[k] -= heaviest;
                let mut c = (offset + next[k] * skip) % m;
                while table[c] != usize::MAX {
                    next[k] += 1;
                    c = (offset + next[k] * skip) % m;
                }
                table[c] = order[k];
                next[k] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 2))
            .collect()
    }

    #[test]
    fn sizes_are_primes_over_100_per_backend() {
        assert_eq!(table_size(1), 251);
        assert_eq!(table_size(3), 307);
        assert_eq!(table_size(10), 1009);
        assert!(is_prime(table_size(160) as u64) && table_size(160) > 16000);
    }

    #[test]
    fn balanced_within_one_percent() {
        for n in [2, 3, 7, 50, 160] {
            let m = table_size(n);
            let t = build(&names(n), m);
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i] += 1;
            }
            let ideal = m as f64 / n as f64;
            for c in counts {
                assert!(
                    (c as f64 - ideal).abs() / ideal <= 0.01 + 1.0 / ideal,
                    "n={n} count={c} ideal={ideal}"
                );
            }
        }
    }

    #[test]
    fn weights_set_each_backends_share_of_the_table() {
        let n = names(3);
        let m = table_size(300);
        let t = build_weighted(&n, &[700_000, 200_000, 100_000], m);
        let mut counts = [0usize; 3];
        for i in &t {
            counts[*i] += 1;
        }
        for (c, want) in counts.iter().zip([0.7, 0.2, 0.1]) {
            assert!((*c as f64 / m as f64 - want).abs() < 0.01, "{counts:?}");
        }
        let t = build_weighted(&n, &[1, 0, 1], 251);
        assert!(t.iter().all(|i| *i != 1), "weight 0 owns nothing");
    }

    #[test]
    fn same_table_whatever_the_input_order() {
        let mut a = names(20);
        let t1: Vec<String> = build(&a, 2003).iter().map(|i| a[*i].clone()).collect();
        a.reverse();
        let t2: Vec<String> = build(&a, 2003).iter().map(|i| a[*i].clone()).collect();
        assert_eq!(t1, t2);
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let n = 10;
        let all = names(n);
        let m = table_size(n);
        let before: Vec<String> = build(&all, m).iter().map(|i| all[*i].clone()).collect();
        let fewer: Vec<String> = all[1..].to_vec();
        let after: Vec<String> = build(&fewer, m).iter().map(|i| fewer[*i].clone()).collect();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **b != all[0])
            .count();
        let owned_by_removed = before.iter().filter(|b| **b == all[0]).count();
        // Slots of the removed backend must move; of the others, only a few percent may.
        assert!(owned_by_removed as f64 / m as f64 <= 1.0 / n as f64 + 0.01);
        assert!(
            (moved as f64) / (m as f64) < 0.05,
            "moved {moved} of {m} slots that did not belong to the removed backend"
        );
    }
}
