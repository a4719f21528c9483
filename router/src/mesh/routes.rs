//! Link-state route computation (DESIGN.md "Mesh"): from every router's
//! link-state record, the graph of routers joined by links both ends
//! report; shortest paths from this router give a next hop per router, and
//! shortest paths from a message's ingress router give the multicast tree.
//! Pure functions over the record database, so they can be tested without
//! sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use petgraph::algo::bellman_ford;
use petgraph::graph::{NodeIndex, UnGraph};
use serde::{Deserialize, Serialize};

/// A router's link-state record: its neighbours and the cost to each,
/// versioned so that newer records replace older ones as they flood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub id: String,
    pub version: u64,
    pub neighbors: BTreeMap<String, u32>,
}

/// Shortest paths from one router to every router it can reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Destination router → the neighbour to send through.
    pub next_hop: BTreeMap<String, String>,
    /// Destination router → path cost.
    pub cost: BTreeMap<String, u64>,
}

/// The graph of links both ends report, nodes in id order (deterministic
/// tie-breaking between equal-cost paths).
struct Topology {
    graph: UnGraph<String, f64>,
    index: HashMap<String, NodeIndex>,
}

impl Topology {
    fn new(db: &HashMap<String, LinkState>) -> Self {
        let ids: BTreeSet<&String> = db.keys().collect();
        let mut graph = UnGraph::new_undirected();
        let mut index = HashMap::new();
        for id in &ids {
            index.insert((*id).clone(), graph.add_node((*id).clone()));
        }
        for a in &ids {
            for (b, cost_ab) in &db[*a].neighbors {
                if a.as_str() >= b.as_str() {
                    continue;
                }
                // A link counts only when both ends report it.
                let Some(cost_ba) = db.get(b).and_then(|s| s.neighbors.get(a.as_str())) else {
                    continue;
                };
                let cost = f64::from((*cost_ab).max(*cost_ba).max(1));
                graph.add_edge(index[*a], index[b], cost);
            }
        }
        Topology { graph, index }
    }

    /// Predecessor of each node on the shortest paths from `root`.
    fn tree(&self, root: &str) -> Option<(Vec<f64>, Vec<Option<NodeIndex>>)> {
        let r = *self.index.get(root)?;
        let paths = bellman_ford(&self.graph, r).ok()?;
        Some((paths.distances, paths.predecessors))
    }
}

/// Next hops and costs from `me` over the link-state database.
pub fn compute(me: &str, db: &HashMap<String, LinkState>) -> Routes {
    let topo = Topology::new(db);
    let Some((dist, pred)) = topo.tree(me) else {
        return Routes::default();
    };
    let me_ix = topo.index[me];
    let mut routes = Routes::default();
    for (id, &ix) in &topo.index {
        if ix == me_ix || !dist[ix.index()].is_finite() {
            continue;
        }
        // Walk back towards `me`; the node just before it is the next hop.
        let mut hop = ix;
        while let Some(p) = pred[hop.index()] {
            if p == me_ix {
                break;
            }
            hop = p;
        }
        routes.next_hop.insert(id.clone(), topo.graph[hop].clone());
        routes.cost.insert(id.clone(), dist[ix.index()] as u64);
    }
    routes
}

/// Each router's parent on the shortest-path tree rooted at `root` (the
/// ingress router of a multicast message).
pub fn tree_parents(root: &str, db: &HashMap<String, LinkState>) -> HashMap<String, String> {
    let topo = Topology::new(db);
    let mut parents = HashMap::new();
    let Some((dist, pred)) = topo.tree(root) else {
        return parents;
    };
    for (id, &ix) in &topo.index {
        if let Some(p) = pred[ix.index()] {
            if dist[ix.index()].is_finite() {
                parents.insert(id.clone(), topo.graph[p].clone());
            }
        }
    }
    parents
}

/// Where `me` forwards a multicast message to reach the routers in
/// `targets` once each, given the parents on the ingress router's tree: the
/// children of `me` on the paths to some target.
pub fn multicast_children(
    me: &str,
    parents: &HashMap<String, String>,
    targets: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in targets {
        let mut child = t.as_str();
        // Walk from the target up the tree; if the walk passes `me`, the
        // node just below it is the child to send to.
        let mut steps = 0;
        while let Some(p) = parents.get(child) {
            if p == me {
                out.insert(child.to_string());
                break;
            }
            child = p;
            steps += 1;
            if steps > parents.len() {
                break;
            }
        }
    }
    out
}

/// [`multicast_children`] computed from the database (for tests and
/// one-off use; the mesh caches the parents per ingress).
pub fn multicast_next_hops(
    me: &str,
    ingress: &str,
    targets: &BTreeSet<String>,
    db: &HashMap<String, LinkState>,
) -> BTreeSet<String> {
    multicast_children(me, &tree_parents(ingress, db), targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn db_from(edges: &[(usize, usize, u32)], n: usize) -> HashMap<String, LinkState> {
        let mut db: HashMap<String, LinkState> = (0..n)
            .map(|i| {
                (
                    format!("r{i}"),
                    LinkState {
                        id: format!("r{i}"),
                        version: 1,
                        neighbors: BTreeMap::new(),
                    },
                )
            })
            .collect();
        for &(a, b, c) in edges {
            if a == b {
                continue;
            }
            db.get_mut(&format!("r{a}"))
                .unwrap()
                .neighbors
                .insert(format!("r{b}"), c);
            db.get_mut(&format!("r{b}"))
                .unwrap()
                .neighbors
                .insert(format!("r{a}"), c);
        }
        db
    }

    /// All-pairs shortest distances by Floyd–Warshall, the reference.
    fn floyd(db: &HashMap<String, LinkState>, n: usize) -> Vec<Vec<u64>> {
        const INF: u64 = u64::MAX / 4;
        let mut d = vec![vec![INF; n]; n];
        for (i, row) in d.iter_mut().enumerate() {
            row[i] = 0;
        }
        for s in db.values() {
            let a: usize = s.id[1..].parse().unwrap();
            for (nb, c) in &s.neighbors {
                let b: usize = nb[1..].parse().unwrap();
                let back = db[nb].neighbors.get(&s.id);
                if let Some(cb) = back {
                    let w = u64::from((*c).max(*cb).max(1));
                    d[a][b] = d[a][b].min(w);
                }
            }
        }
        for k in 0..n {
            for i in 0..n {
                for j in 0..n {
                    if d[i][k] + d[k][j] < d[i][j] {
                        d[i][j] = d[i][k] + d[k][j];
                    }
                }
            }
        }
        d
    }

    #[test]
    fn chain_and_ring() {
        let chain = db_from(&[(0, 1, 1), (1, 2, 1)], 3);
        let r = compute("r0", &chain);
        assert_eq!(r.next_hop["r2"], "r1");
        assert_eq!(r.cost["r2"], 2);
        let ring = db_from(&[(0, 1, 1), (1, 2, 1), (2, 3, 1), (3, 0, 1)], 4);
        let r = compute("r0", &ring);
        assert_eq!(r.next_hop["r1"], "r1");
        assert_eq!(r.next_hop["r3"], "r3");
        assert_eq!(r.cost["r2"], 2);
        // The ring without r1: r2 is reached the other way.
        let mut broken = ring.clone();
        broken.remove("r1");
        let r = compute("r0", &broken);
        assert_eq!(r.next_hop["r2"], "r3");
        assert!(!r.next_hop.contains_key("r1"));
    }

    #[test]
    fn one_sided_links_do_not_count() {
        let mut db = db_from(&[(0, 1, 1)], 3);
        db.get_mut("r1").unwrap().neighbors.insert("r2".into(), 1);
        assert!(!compute("r0", &db).next_hop.contains_key("r2"));
    }

    #[test]
    fn multicast_tree_reaches_each_target_once() {
        // r0 - r1 - r2, r1 - r3: from ingress r0, r1 forwards to r2 and r3.
        let db = db_from(&[(0, 1, 1), (1, 2, 1), (1, 3, 1)], 4);
        let targets: BTreeSet<String> = ["r2", "r3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            multicast_next_hops("r0", "r0", &targets, &db),
            ["r1".to_string()].into()
        );
        assert_eq!(multicast_next_hops("r1", "r0", &targets, &db), targets);
        assert!(multicast_next_hops("r2", "r0", &targets, &db).is_empty());
    }

    proptest! {
        /// Next hops follow shortest paths, never loop, and reach the
        /// destination; any set of links (any sequence of ups and downs
        /// ends in one) gives the same answer as the reference.
        #[test]
        fn routes_are_shortest_and_loop_free(n in 2usize..8, edges in proptest::collection::vec((0usize..8, 0usize..8, 1u32..5), 0..20)) {
            let edges: Vec<_> = edges.into_iter().filter(|(a, b, _)| *a < n && *b < n).collect();
            let db = db_from(&edges, n);
            let d = floyd(&db, n);
            let all: Vec<Routes> = (0..n).map(|i| compute(&format!("r{i}"), &db)).collect();
            for i in 0..n {
                for j in 0..n {
                    if i == j { continue; }
                    let dest = format!("r{j}");
                    let reachable = d[i][j] < u64::MAX / 4;
                    prop_assert_eq!(all[i].next_hop.contains_key(&dest), reachable);
                    if !reachable { continue; }
                    prop_assert_eq!(all[i].cost[&dest], d[i][j]);
                    // Following next hops reaches j within n hops, each hop
                    // strictly closer.
                    let mut at = i;
                    let mut hops = 0;
                    while at != j {
                        let nh: usize = all[at].next_hop[&dest][1..].parse().unwrap();
                        prop_assert!(d[nh][j] < d[at][j]);
                        at = nh;
                        hops += 1;
                        prop_assert!(hops <= n);
                    }
                }
            }
        }

        /// The multicast tree from any ingress delivers to every reachable
        /// target exactly once.
        #[test]
        fn multicast_delivers_once(n in 2usize..7, edges in proptest::collection::vec((0usize..7, 0usize..7, 1u32..4), 0..16), mask in 0u32..128) {
            let edges: Vec<_> = edges.into_iter().filter(|(a, b, _)| *a < n && *b < n).collect();
            let db = db_from(&edges, n);
            let targets: BTreeSet<String> = (0..n).filter(|i| mask & (1 << i) != 0).map(|i| format!("r{i}")).collect();
            let d = floyd(&db, n);
            for ingress in 0..n {
                let ing = format!("r{ingress}");
                let mut received: HashMap<String, u32> = HashMap::new();
                let mut queue = vec![ing.clone()];
                while let Some(at) = queue.pop() {
                    *received.entry(at.clone()).or_default() += 1;
                    prop_assert!(received.values().all(|c| *c == 1), "a router got a copy twice");
                    for nb in multicast_next_hops(&at, &ing, &targets, &db) {
                        queue.push(nb);
                    }
                }
                for t in &targets {
                    let j: usize = t[1..].parse().unwrap();
                    prop_assert_eq!(received.contains_key(t), d[ingress][j] < u64::MAX / 4);
                }
            }
        }
    }
}
