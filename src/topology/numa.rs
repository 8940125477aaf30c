//! The NUMA node of host memory, from the kernel's `/proc/<pid>/maps` and
//! `/proc/<pid>/numa_maps`, so host segments can be striped over the rails of their node.
//!
//! `maps` gives each mapping's range; `numa_maps` gives, per mapping start, its memory policy
//! (`default`, `bind:1`, `prefer:0`, `interleave:0-1`, ...) and the pages resident on each
//! node (`N0=12 N1=3`). A range's node is the node its policy binds it to, else the single node
//! holding every resident page of the mappings it overlaps; pages not yet touched count for
//! nothing, and memory spread over several nodes has no node. Parsing is pure and tested on
//! text; [`node_of`] reads the files of this process.

use std::collections::BTreeMap;

/// The NUMA node of `[addr, addr + len)` in this process, or `None` when it cannot be told (no
/// NUMA support in the kernel, no resident pages yet, pages on several nodes).
pub fn node_of(addr: u64, len: u64) -> Option<u32> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let numa = std::fs::read_to_string("/proc/self/numa_maps").ok()?;
    node_in(&maps, &numa, addr, len)
}

/// [`node_of`] over the text of a `maps` and a `numa_maps` file.
pub fn node_in(maps: &str, numa_maps: &str, addr: u64, len: u64) -> Option<u32> {
    let end = addr.checked_add(len)?;
    let by_start: BTreeMap<u64, &str> = numa_maps
        .lines()
        .filter_map(|l| {
            let (start, rest) = l.split_once(' ')?;
            Some((u64::from_str_radix(start, 16).ok()?, rest))
        })
        .collect();
    let mut pages: BTreeMap<u32, u64> = BTreeMap::new();
    let mut bound = None;
    let mut covered = false;
    for (start, stop) in maps.lines().filter_map(mapping_range) {
        if stop <= addr || start >= end {
            continue;
        }
        covered = true;
        let Some(rest) = by_start.get(&start) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        match fields.next().and_then(policy_node) {
            Some(Policy::One(n)) => match bound {
                None => bound = Some(n),
                Some(b) if b == n => {}
                Some(_) => return None,
            },
            Some(Policy::Several) => return None,
            None => {}
        }
        for f in fields {
            if let Some((node, count)) = f
                .strip_prefix('N')
                .and_then(|x| x.split_once('='))
                .and_then(|(n, c)| Some((n.parse::<u32>().ok()?, c.parse::<u64>().ok()?)))
            {
                *pages.entry(node).or_default() += count;
            }
        }
    }
    if !covered {
        return None;
    }
    if bound.is_some() {
        return bound;
    }
    let mut resident = pages.into_iter().filter(|&(_, n)| n > 0);
    match (resident.next(), resident.next()) {
        (Some((node, _)), None) => Some(node),
        _ => None,
    }
}

/// `start-end perms ...` of a `maps` line.
fn mapping_range(line: &str) -> Option<(u64, u64)> {
    let (range, _) = line.split_once(' ')?;
    let (a, b) = range.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

enum Policy {
    One(u32),
    Several,
}

/// The node a `numa_maps` policy field pins memory to: `bind:N` / `prefer:N` /
/// `preferred_many:N` name one node; a list or range (`bind:0-1`, `interleave:0,1`) several;
/// `default` and `local` none (the pages' nodes decide).
fn policy_node(policy: &str) -> Option<Policy> {
    let (kind, nodes) = policy.split_once(':')?;
    if !matches!(
        kind,
        "bind" | "prefer" | "preferred" | "preferred_many" | "interleave"
    ) {
        return None;
    }
    match nodes.parse::<u32>() {
        Ok(n) => Some(Policy::One(n)),
        Err(_) => Some(Policy::Several),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
7f0000300000-7f0000400000 rw-p 00000000 00:00 0 
7f0000400000-7f0000500000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";
    const NUMA: &str = "\
7f0000000000 default anon=256 dirty=256 N1=256 kernelpagesize_kB=4
7f0000100000 default anon=250 dirty=250 N1=200 N0=50 kernelpagesize_kB=4
7f0000200000 bind:0 anon=3 dirty=3 N1=3 kernelpagesize_kB=4
7f0000300000 default
7f0000400000 interleave:0-1 anon=8 N0=4 N1=4 kernelpagesize_kB=4
7ffd00000000 default stack anon=4 dirty=4 N0=4 kernelpagesize_kB=4
";
    const MIB: u64 = 1 << 20;
    const BASE: u64 = 0x7f00_0000_0000;

    #[test]
    fn resident_pages_on_one_node_give_that_node() {
        assert_eq!(node_in(MAPS, NUMA, BASE + 4096, 8192), Some(1));
        assert_eq!(node_in(MAPS, NUMA, 0x7ffd_0000_0000, 4096), Some(0));
    }

    #[test]
    fn pages_on_several_nodes_give_none() {
        assert_eq!(node_in(MAPS, NUMA, BASE + MIB, 4096), None);
        // Two mappings, each on one node but not the same one.
        assert_eq!(node_in(MAPS, NUMA, BASE + MIB - 8, 16), None);
    }

    #[test]
    fn a_binding_policy_wins_over_the_pages() {
        assert_eq!(node_in(MAPS, NUMA, BASE + 2 * MIB, 64), Some(0));
        assert_eq!(node_in(MAPS, NUMA, BASE + 4 * MIB, 64), None, "interleaved");
    }

    #[test]
    fn untouched_or_unmapped_memory_gives_none() {
        assert_eq!(
            node_in(MAPS, NUMA, BASE + 3 * MIB, MIB),
            None,
            "no pages yet"
        );
        assert_eq!(node_in(MAPS, NUMA, 0x1000, 4096), None, "not mapped");
        assert_eq!(node_in(MAPS, NUMA, u64::MAX - 1, 4), None, "wraps");
        assert_eq!(node_in("garbage", "more garbage", BASE, 4096), None);
    }

    #[test]
    fn a_single_node_host_puts_touched_memory_on_node_0() {
        let single = !std::path::Path::new("/sys/devices/system/node/node1").exists();
        if single && std::path::Path::new("/proc/self/numa_maps").exists() {
            let v = vec![7u8; 1 << 20];
            assert_eq!(node_of(v.as_ptr() as u64, v.len() as u64), Some(0));
        }
    }
}
