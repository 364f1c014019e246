//! Cross-cluster traffic scheduling (GlobalTrafficPolicy): the share of new connections each
//! priority level gets, by Envoy's priority-load rules (`LoadBalancerBase::
//! recalculatePerPriorityState`, `recalculatePerPriorityPanic`, `recalculateLoadInTotalPanic`),
//! in Envoy's integer arithmetic so that shares match its documented numbers exactly; and the
//! weights of ActiveActive clusters scaled by their availability, as Envoy scales locality
//! weights. Pure functions; the agent programs their results.

/// One priority level's endpoints: every endpoint its EndpointSlices list (`total`, ready or
/// not) and the healthy ones (ready and not ejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Level {
    /// Endpoints listed.
    pub total: u32,
    /// Endpoints ready and not ejected.
    pub healthy: u32,
}

/// The shares of the levels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Loads {
    /// Percent of new connections per level; they add up to 100.
    pub percent: Vec<u32>,
    /// Per level: in panic, its share goes to all its endpoints, healthy or not.
    pub panic: Vec<bool>,
    /// No level has a healthy endpoint and panic is off: nothing can be served.
    pub unavailable: bool,
}

/// Envoy's default overprovisioning factor (1.4), in percent.
pub const DEFAULT_OVERPROVISIONING: u32 = 140;
/// Envoy's default panic threshold, in percent.
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// A level's health: min(100, factor x healthy / total), factor in percent (140 = 1.4).
pub fn health(level: Level, factor_percent: u32) -> u32 {
    if level.total == 0 {
        return 0;
    }
    let h = u64::from(factor_percent) * u64::from(level.healthy) / u64::from(level.total);
    h.min(100) as u32
}

/// Whether a level is below the panic threshold (percent of its endpoints healthy; an empty
/// level is at 0%).
fn below_threshold(level: Level, threshold: u32) -> bool {
    let healthy_percent = if level.total == 0 {
        0.0
    } else {
        100.0 * f64::from(level.healthy) / f64::from(level.total)
    };
    healthy_percent < f64::from(threshold)
}

/// The share of each level (ordered, highest priority first), with overprovisioning factor
/// `factor_percent` (140 = 1.4) and panic threshold `panic_threshold` (percent; 0 disables
/// panic). As Envoy: levels fill in order by their health scaled to the normalized total
/// health (at most 100), rounding left-overs go to the first level with health; panic is
/// never on while the total health is 100; when every level is in panic, shares follow the
/// levels' endpoint counts; with no healthy endpoint anywhere and panic off, everything is
/// "P0" and nothing can be served.
pub fn priority_loads(levels: &[Level], factor_percent: u32, panic_threshold: u32) -> Loads {
    let n = levels.len();
    let mut out = Loads {
        percent: vec![0; n],
        panic: vec![false; n],
        unavailable: false,
    };
    if n == 0 {
        return out;
    }
    let health: Vec<u32> = levels.iter().map(|l| health(*l, factor_percent)).collect();
    let normalized = health.iter().sum::<u32>().min(100);
    // With no health anywhere every share stays 0 here: panic (below) or unavailability.
    let mut remaining = 100u32;
    let mut first = None;
    for (i, h) in health.iter().enumerate() {
        if first.is_none() && *h > 0 {
            first = Some(i);
        }
        out.percent[i] = remaining.min((h * 100).checked_div(normalized).unwrap_or(0));
        remaining -= out.percent[i];
    }
    if let Some(f) = first {
        out.percent[f] += remaining;
    }
    let threshold = panic_threshold.min(100);
    if threshold == 0 && normalized == 0 {
        out.percent[0] = 100;
        out.unavailable = true;
        return out;
    }
    for (i, l) in levels.iter().enumerate() {
        out.panic[i] = normalized != 100 && below_threshold(*l, threshold);
    }
    if out.panic.iter().all(|p| *p) {
        // Total panic: by endpoint counts, healthy or not.
        let counts: Vec<u64> = levels.iter().map(|l| u64::from(l.total)).collect();
        out.percent = proportional(&counts);
        if counts.iter().all(|c| *c == 0) {
            out.percent[0] = 100;
            out.unavailable = true;
        }
    }
    out
}

/// Percent shares proportional to `parts` (integer division), the rounding left-over to the
/// first non-zero part, as Envoy's total-panic loads; all zero when every part is.
fn proportional(parts: &[u64]) -> Vec<u32> {
    let sum: u64 = parts.iter().sum();
    if sum == 0 {
        return vec![0; parts.len()];
    }
    let mut out: Vec<u32> = parts.iter().map(|p| (p * 100 / sum) as u32).collect();
    let left = 100 - out.iter().sum::<u32>();
    if let Some(i) = parts.iter().position(|p| *p > 0) {
        out[i] += left;
    }
    out
}

/// ActiveActive: each cluster's share (percent, adding up to 100 when any is available) from
/// its weight scaled by its availability, as Envoy's locality weights:
/// `weight x min(100, factor x healthy / total)`. Clusters of weight 0 or with no healthy
/// endpoint get nothing; all zero when none can take traffic.
pub fn weighted_shares(clusters: &[(u32, Level)], factor_percent: u32) -> Vec<u32> {
    let effective: Vec<u64> = clusters
        .iter()
        .map(|(w, l)| u64::from(*w) * u64::from(health(*l, factor_percent)))
        .collect();
    proportional(&effective)
}

/// A GlobalTrafficPolicy's `spec`, as far as the shares go.
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// `Locality`, `FailOver` or `ActiveActive`.
    pub lb_type: String,
    /// ActiveActive's weights.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// FailOver's levels, in order.
    #[serde(default)]
    pub priorities: Vec<Priority>,
    /// The overprovisioning factor (default 1.4).
    #[serde(default)]
    pub overprovisioning_factor: Option<f64>,
    /// The panic threshold in percent (default 50).
    #[serde(default)]
    pub panic_threshold: Option<u32>,
    /// Ejection of failing endpoints by the datapath.
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
}

/// `spec.outlierDetection`; every field defaults as Envoy's example in the policy's docs.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSpec {
    /// Consecutive failed connects that eject an endpoint (default 5).
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    /// Ejection time per ejection so far, a Go duration (default `30s`).
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// At most this percent of a level's endpoints ejected at once (default 100).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

/// Default `consecutiveFailures`.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default `baseEjectionTime`, in milliseconds.
pub const DEFAULT_BASE_EJECTION_MS: u32 = 30_000;

impl OutlierSpec {
    /// The settings with their defaults: (consecutive failures, base ejection ms, max percent).
    pub fn settings(spec: Option<&OutlierSpec>) -> (u32, u32, u32) {
        let d = OutlierSpec::default();
        let o = spec.unwrap_or(&d);
        (
            o.consecutive_failures
                .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES)
                .max(1),
            o.base_ejection_time
                .as_deref()
                .and_then(weir_model::validate::duration_ms)
                .map_or(DEFAULT_BASE_EJECTION_MS, |m| {
                    m.min(u64::from(u32::MAX)) as u32
                }),
            o.max_ejection_percent.unwrap_or(100).min(100),
        )
    }
}

/// An ActiveActive target.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct Target {
    /// Cluster id.
    pub cluster: String,
    /// Relative weight.
    pub weight: u32,
}

/// A FailOver level: named clusters, or clusters chosen by their ClusterProperties.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct Priority {
    /// The clusters of the level.
    #[serde(default)]
    pub clusters: Option<Vec<String>>,
    /// Or those matching this selector (`{}`: every cluster left).
    #[serde(default)]
    pub selector: Option<Selector>,
}

/// Clusters whose ClusterProperties named here equal the importing cluster's.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// ClusterProperty names (such as `region.weir.dev`).
    #[serde(default)]
    pub same_as_importer: Vec<String>,
}

/// One exporting cluster's part in a plan.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterShare {
    /// Cluster id.
    pub cluster: String,
    /// Its endpoints.
    pub endpoints: Level,
    /// The level it is in (FailOver and Locality), if any.
    pub level: Option<usize>,
    /// Percent of new connections it gets now.
    pub percent: f64,
    /// Its level is in panic: all its endpoints are used, healthy or not.
    pub panic: bool,
    /// Why it gets that share.
    pub reason: String,
}

/// A [`ClusterShare`] as the policy's status and `weir status` show it: the share rounded to
/// a tenth of a point, the level only when the cluster has one, panic only when on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShareRow {
    /// Cluster id.
    pub cluster: String,
    /// Endpoints ready and not ejected.
    pub healthy: u32,
    /// Endpoints listed.
    pub total: u32,
    /// Percent of new connections it gets.
    pub share: f64,
    /// Why.
    pub reason: String,
    /// Its level (FailOver, Locality).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<usize>,
    /// Its level is in panic.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub panic: bool,
}

impl From<&ClusterShare> for ShareRow {
    fn from(s: &ClusterShare) -> Self {
        ShareRow {
            cluster: s.cluster.clone(),
            healthy: s.endpoints.healthy,
            total: s.endpoints.total,
            share: (s.percent * 10.0).round() / 10.0,
            reason: s.reason.clone(),
            level: s.level,
            panic: s.panic,
        }
    }
}

/// The ClusterProperties of each cluster (`cluster.clusterset.k8s.io` and the users' own).
pub type Properties =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>;

impl PolicySpec {
    /// The factor in Envoy's integer percent (1.4 -> 140).
    pub fn factor_percent(&self) -> u32 {
        let f = self
            .overprovisioning_factor
            .unwrap_or(1.4)
            .clamp(1.0, 100.0);
        (f * 100.0).round() as u32
    }

    /// The levels, as lists of clusters among `exporting`: Locality's one (the importer),
    /// FailOver's two by default (the importer, then every other) or exactly those written,
    /// each cluster in the first it matches.
    pub fn levels(
        &self,
        importer: &str,
        props: &Properties,
        exporting: &[String],
    ) -> Vec<Vec<String>> {
        match self.lb_type.as_str() {
            "Locality" => vec![exporting
                .iter()
                .filter(|c| *c == importer)
                .cloned()
                .collect()],
            "FailOver" if self.priorities.is_empty() => vec![
                exporting
                    .iter()
                    .filter(|c| *c == importer)
                    .cloned()
                    .collect(),
                exporting
                    .iter()
                    .filter(|c| *c != importer)
                    .cloned()
                    .collect(),
            ],
            "FailOver" => {
                let mut placed = std::collections::BTreeSet::new();
                let mine = props.get(importer);
                self.priorities
                    .iter()
                    .map(|p| {
                        let level: Vec<String> = exporting
                            .iter()
                            .filter(|c| !placed.contains(*c))
                            .filter(|c| match (&p.clusters, &p.selector) {
                                (Some(names), _) => names.contains(c),
                                (None, Some(sel)) => sel.same_as_importer.iter().all(|k| {
                                    let theirs = props.get(*c).and_then(|m| m.get(k));
                                    theirs.is_some() && theirs == mine.and_then(|m| m.get(k))
                                }),
                                (None, None) => false,
                            })
                            .cloned()
                            .collect();
                        placed.extend(level.iter().cloned());
                        level
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// The share of every exporting cluster (`clusters`: its id and endpoints) for the
    /// clients of cluster `importer`.
    pub fn plan(
        &self,
        importer: &str,
        props: &Properties,
        clusters: &[(String, Level)],
    ) -> Vec<ClusterShare> {
        let names: Vec<String> = clusters.iter().map(|(c, _)| c.clone()).collect();
        self.plan_in(&self.levels(importer, props, &names), clusters)
    }

    /// [`PolicySpec::plan`] over levels already placed (ignored for ActiveActive).
    pub fn plan_in(
        &self,
        levels: &[Vec<String>],
        clusters: &[(String, Level)],
    ) -> Vec<ClusterShare> {
        let factor = self.factor_percent();
        let endpoints = |c: &str| {
            clusters
                .iter()
                .find(|(n, _)| n == c)
                .map(|(_, l)| *l)
                .unwrap_or_default()
        };
        let mut out: Vec<ClusterShare> = clusters
            .iter()
            .map(|(c, l)| ClusterShare {
                cluster: c.clone(),
                endpoints: *l,
                reason: "in no level of the policy".into(),
                ..Default::default()
            })
            .collect();
        if self.lb_type == "ActiveActive" {
            let weights: Vec<(u32, Level)> = clusters
                .iter()
                .map(|(c, l)| {
                    let w = self
                        .targets
                        .iter()
                        .find(|t| t.cluster == *c)
                        .map_or(0, |t| t.weight);
                    (w, *l)
                })
                .collect();
            let shares = weighted_shares(&weights, factor);
            for ((s, p), (w, l)) in out.iter_mut().zip(shares).zip(weights) {
                s.percent = f64::from(p);
                s.reason = format!("weight {w} x availability {}%", health(l, factor));
            }
            return out;
        }
        let sums: Vec<Level> = levels
            .iter()
            .map(|l| {
                l.iter().fold(Level::default(), |a, c| {
                    let e = endpoints(c);
                    Level {
                        total: a.total + e.total,
                        healthy: a.healthy + e.healthy,
                    }
                })
            })
            .collect();
        let loads = priority_loads(
            &sums,
            factor,
            self.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD),
        );
        for (i, level) in levels.iter().enumerate() {
            for c in level {
                let Some(s) = out.iter_mut().find(|s| s.cluster == *c) else {
                    continue;
                };
                let (mine, all) = if loads.panic[i] {
                    (s.endpoints.total, sums[i].total)
                } else {
                    (s.endpoints.healthy, sums[i].healthy)
                };
                s.level = Some(i);
                s.panic = loads.panic[i];
                s.percent = if loads.unavailable || all == 0 {
                    0.0
                } else {
                    f64::from(loads.percent[i]) * f64::from(mine) / f64::from(all)
                };
                s.reason = format!(
                    "level {i} ({}/{} healthy, health {}%) takes {}%{}",
                    sums[i].healthy,
                    sums[i].total,
                    health(sums[i], factor),
                    loads.percent[i],
                    if loads.panic[i] {
                        ", in panic: all its endpoints"
                    } else {
                        ""
                    }
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(healthy: u32, total: u32) -> Level {
        Level { total, healthy }
    }

    fn p0_share(p0_healthy_percent: u32) -> u32 {
        let l = priority_loads(&[lv(p0_healthy_percent, 100), lv(100, 100)], 140, 50);
        l.percent[0]
    }

    #[test]
    fn envoys_table_for_p0_with_p1_healthy() {
        // docs: arch_overview/upstream/load_balancing/priority
        assert_eq!(p0_share(100), 100);
        assert_eq!(p0_share(72), 100);
        assert_eq!(p0_share(71), 99);
        assert_eq!(p0_share(50), 70);
        assert_eq!(p0_share(25), 35);
        assert_eq!(p0_share(0), 0);
        // Ten local endpoints, five unready: 70% stay local.
        let l = priority_loads(&[lv(5, 10), lv(10, 10)], 140, 50);
        assert_eq!(l.percent, [70, 30]);
        assert_eq!(l.panic, [false, false]);
    }

    #[test]
    fn degraded_levels_are_normalized() {
        // Health {20, 30}: loads {40, 60} (no panic when disabled).
        let levels = [lv(1, 7), lv(3, 14)];
        assert_eq!(health(levels[0], 140), 20);
        assert_eq!(health(levels[1], 140), 30);
        let l = priority_loads(&levels, 140, 0);
        assert_eq!(l.percent, [40, 60]);
        assert!(!l.unavailable);
        // With the default threshold both levels are in panic: shares by endpoint count.
        let l = priority_loads(&levels, 140, 50);
        assert_eq!(l.panic, [true, true]);
        assert_eq!(l.percent, [34, 66]);
    }

    #[test]
    fn panic_only_below_full_total_health_and_per_level() {
        // P0 at 10% healthy but P1 carries everything: total health 100, no panic anywhere.
        let l = priority_loads(&[lv(1, 10), lv(10, 10)], 140, 50);
        assert_eq!(l.percent, [14, 86]);
        assert_eq!(l.panic, [false, false]);
        // P0 at 10%, P1 at 40%: total 14 + 56 = 70 < 100; P0 in panic (10% < 50%), P1 too.
        let l = priority_loads(&[lv(1, 10), lv(4, 10)], 140, 50);
        assert_eq!(l.panic, [true, true]);
        assert_eq!(l.percent, [50, 50]);
        // P0 at 10%, P1 at 60%: P1 is not in panic, so the healthy loads stand.
        let l = priority_loads(&[lv(1, 10), lv(6, 10)], 140, 50);
        assert_eq!(l.panic, [true, false]);
        assert_eq!(l.percent, [15, 85]);
    }

    #[test]
    fn no_healthy_endpoint_anywhere() {
        // Panic on: every endpoint of every level, by counts.
        let l = priority_loads(&[lv(0, 3), lv(0, 1)], 140, 50);
        assert_eq!(l.percent, [75, 25]);
        assert!(l.panic.iter().all(|p| *p) && !l.unavailable);
        // Panic off: nothing to serve.
        let l = priority_loads(&[lv(0, 3), lv(0, 1)], 140, 0);
        assert_eq!(l.percent, [100, 0]);
        assert!(l.unavailable);
        // No endpoints at all.
        let l = priority_loads(&[lv(0, 0), lv(0, 0)], 140, 50);
        assert_eq!(l.percent, [100, 0]);
        assert!(l.unavailable);
        // An empty first level: everything to the next.
        let l = priority_loads(&[lv(0, 0), lv(2, 2)], 140, 50);
        assert_eq!(l.percent, [0, 100]);
    }

    #[test]
    fn gradual_scale_up_follows_the_formula() {
        // Ten local endpoints listed, turning ready one by one, the remote level healthy.
        let shares: Vec<u32> = (0..=10)
            .map(|ready| priority_loads(&[lv(ready, 10), lv(10, 10)], 140, 50).percent[0])
            .collect();
        assert_eq!(shares, [0, 14, 28, 42, 56, 70, 84, 98, 100, 100, 100]);
    }

    #[test]
    fn active_active_weights_scale_with_availability() {
        let full = lv(10, 10);
        assert_eq!(weighted_shares(&[(80, full), (20, full)], 140), [80, 20]);
        // c2 at half its endpoints: 80 x 70 against 20 x 100.
        assert_eq!(
            weighted_shares(&[(80, lv(5, 10)), (20, full)], 140),
            [74, 26]
        );
        assert_eq!(weighted_shares(&[(0, full), (20, full)], 140), [0, 100]);
        assert_eq!(
            weighted_shares(&[(80, lv(0, 10)), (20, lv(0, 3))], 140),
            [0, 0]
        );
        assert_eq!(
            weighted_shares(&[(1, full), (1, full), (1, full)], 140),
            [34, 33, 33]
        );
    }

    fn props(v: &[(&str, &str)]) -> Properties {
        v.iter()
            .map(|(c, region)| {
                let mut m = std::collections::BTreeMap::new();
                m.insert("region.weir.dev".to_string(), region.to_string());
                (c.to_string(), m)
            })
            .collect()
    }

    fn spec(v: serde_json::Value) -> PolicySpec {
        serde_json::from_value(v).unwrap()
    }

    fn percents(plan: &[ClusterShare]) -> Vec<(String, u32)> {
        plan.iter()
            .map(|s| (s.cluster.clone(), s.percent.round() as u32))
            .collect()
    }

    #[test]
    fn failover_defaults_to_own_cluster_then_the_rest() {
        let p = spec(serde_json::json!({"lbType": "FailOver"}));
        let clusters = [
            ("c1".to_string(), lv(5, 10)),
            ("c2".into(), lv(10, 10)),
            ("c3".into(), lv(10, 10)),
        ];
        let plan = p.plan("c1", &Properties::new(), &clusters);
        assert_eq!(
            percents(&plan),
            [("c1".into(), 70), ("c2".into(), 15), ("c3".into(), 15)]
        );
        assert_eq!(plan[1].level, Some(1));
        assert!(
            plan[0].reason.contains("5/10 healthy"),
            "{}",
            plan[0].reason
        );
    }

    #[test]
    fn priorities_by_cluster_and_by_property() {
        let p = spec(serde_json::json!({"lbType": "FailOver", "priorities": [
            {"clusters": ["c1"]}, {"selector": {"sameAsImporter": ["region.weir.dev"]}}, {"selector": {}}]}));
        let pr = props(&[("c1", "eu"), ("c2", "eu"), ("c3", "us")]);
        let names: Vec<String> = ["c1", "c2", "c3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            p.levels("c1", &pr, &names),
            [vec!["c1".to_string()], vec!["c2".into()], vec!["c3".into()]]
        );
        // c1 down: c2 (same region) takes everything, c3 nothing.
        let clusters = [
            ("c1".to_string(), lv(0, 4)),
            ("c2".into(), lv(4, 4)),
            ("c3".into(), lv(4, 4)),
        ];
        assert_eq!(
            percents(&p.plan("c1", &pr, &clusters)),
            [("c1".into(), 0), ("c2".into(), 100), ("c3".into(), 0)]
        );
        // Only the levels written: without the catch-all, c3 is in none.
        let p =
            spec(serde_json::json!({"lbType": "FailOver", "priorities": [{"clusters": ["c1"]}]}));
        let plan = p.plan("c1", &pr, &clusters);
        assert_eq!(plan[2].level, None);
        assert!(plan[2].reason.contains("no level"));
    }

    #[test]
    fn locality_and_active_active() {
        let clusters = [("c1".to_string(), lv(2, 2)), ("c2".into(), lv(2, 2))];
        let p = spec(serde_json::json!({"lbType": "Locality"}));
        assert_eq!(
            percents(&p.plan("c1", &Properties::new(), &clusters)),
            [("c1".into(), 100), ("c2".into(), 0)]
        );
        let p = spec(
            serde_json::json!({"lbType": "ActiveActive", "targets": [{"cluster": "c1", "weight": 80}, {"cluster": "c2", "weight": 20}]}),
        );
        let plan = p.plan("c1", &Properties::new(), &clusters);
        assert_eq!(percents(&plan), [("c1".into(), 80), ("c2".into(), 20)]);
        assert!(plan[0].reason.contains("weight 80"));
        assert_eq!(
            spec(serde_json::json!({"lbType": "FailOver", "overprovisioningFactor": 1.25}))
                .factor_percent(),
            125
        );
    }
}
