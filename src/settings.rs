//! The validated settings that shape computed output: naming, ports, modes. Pure data, shared by
//! `run` and `render`, so that both produce the same objects from the same flags.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// What the `--expose-ports` flag selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExposePorts {
    /// Only the mesh port, as number `--global-port` (Admiral's behaviour).
    Primary,
    /// Every Service port, under its own number.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VipMode {
    /// A stable address per host from `--vip-cidr`.
    Allocate,
    /// No `addresses` on ServiceEntries.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportTo {
    /// `exportTo` omitted: visible to every namespace.
    All,
    /// Only the client namespaces, the workload's own namespace and `istio-system`.
    Dependents,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    Generate,
    Off,
}

/// Who may speak for an identity (`--tenancy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Tenancy {
    /// Every claim is accepted, as Admiral does; a claim on an identity that some Namespace names
    /// in `flotilla.io/identities`, from a namespace that may not run it, is reported.
    #[default]
    Open,
    /// An identity is served, configured and spoken for only from namespaces whose
    /// `flotilla.io/identities` allows it (or a hub namespace of `--dependency-namespace`, for
    /// Dependencies); every other claim is refused and reported.
    Owned,
}

/// What a ServiceEntry pins its endpoints' certificates to (`--subject-alt-names`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SanForm {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` of every workload serving
    /// the host: Istio's own certificates.
    Workload,
    /// `spiffe://<--san-prefix>/<identity>`: Admiral's `--enable_san` form, for fleets whose CA
    /// issues such certificates.
    Identity,
    /// None: any certificate of the mesh is accepted (Admiral's default).
    Off,
}

/// An IPv4 CIDR block such as `240.0.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// The address at `offset` from the start of the block (offset < size).
    pub fn nth(&self, offset: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(offset as u32))
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix_len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if !(8..=30).contains(&prefix_len) {
            return Err(format!("{s:?}: the prefix length must be between 8 and 30"));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "{s:?}: host bits are set; did you mean {}/{prefix_len}?",
                Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(Ipv4Cidr { network: addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// A `key=value` label selector term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelTerm {
    pub key: String,
    pub value: String,
}

impl FromStr for LabelTerm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(LabelTerm { key: k.trim().to_string(), value: v.trim().to_string() }),
            _ => Err(format!("{s:?} is not a label term (key=value)")),
        }
    }
}

impl fmt::Display for LabelTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// The keys that name an object's identity and env (Admiral's `--workload_identity_key`,
/// `--admiral_crd_identity_label` and `--env_key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// A workload's identity: its pod template's label, else the annotation.
    pub identity: String,
    /// A policy's identity: its label, else `spec.selector[<key>]`, else `spec.selector.identity`.
    pub policy_identity: String,
    /// An env: the pod template's (a policy's) annotation, else label, then label `env`.
    pub env: String,
    /// Labels of a Deployment or Rollout (their metadata's, keys only; `*`: any workload) that ask
    /// for its hosts' aliases under `Settings::alias_suffixes`, and its destinations' (Admiral's
    /// `--additional_endpoint_label_filters`).
    pub alias_labels: Vec<String>,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            identity: "identity".into(),
            policy_identity: "identity".into(),
            env: crate::meta::ANNOTATION_ENV.into(),
            alias_labels: Vec::new(),
        }
    }
}

/// Everything the pure engine needs to know about the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub sync_namespace: String,
    pub keys: Keys,
    /// Suffixes under which hosts get alias VirtualServices, `<env>.<identity>.<suffix>` routed to
    /// the host (Admiral's `--additional_endpoint_suffixes`).
    pub alias_suffixes: Vec<String>,
    pub hostname_suffix: String,
    pub expose_ports: ExposePorts,
    pub global_port: u16,
    pub gateway_port: u16,
    /// Tried in order; the first that selects a Service in `istio-system` wins.
    pub gateway_selectors: Vec<LabelTerm>,
    pub vip_mode: VipMode,
    pub vip_cidr: Ipv4Cidr,
    pub export_to: ExportTo,
    pub sidecar_mode: SidecarMode,
    /// Slow start of new endpoints in every DestinationRule, in seconds (Admiral's
    /// `--default_warmup_duration_in_seconds`, 45); 0 leaves it out.
    pub warmup_seconds: u32,
    /// This installation's name, in the `flotilla.io/instance` label of everything it writes.
    pub instance: String,
    /// `--adopt-from`: whose objects under the names flotilla writes are taken over in place.
    pub adopt_from: Option<AdoptFrom>,
    /// `--import-vips-from`: the Admiral address store (namespace, name) in the hub whose
    /// addresses new hosts take.
    pub import_vips_from: Option<(String, String)>,
    /// `--tenancy`: whether Namespaces' `flotilla.io/identities` are enforced.
    pub tenancy: Tenancy,
    /// `--dependency-namespace`: hub namespaces whose Dependencies the platform team owns; any
    /// source is accepted there under `--tenancy=owned`.
    pub dependency_namespaces: Vec<String>,
    pub san_form: SanForm,
    /// The SPIFFE trust domain of members that do not name their own.
    pub trust_domain: String,
    /// Admiral's `--san_prefix` (`--subject-alt-names=identity`).
    pub san_prefix: String,
}

/// The controllers whose objects flotilla can take over (`--adopt-from`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdoptFrom {
    /// Objects annotated `app.kubernetes.io/created-by: admiral`.
    Admiral,
}

impl Settings {
    /// Whose objects plans may write over.
    pub fn owner(&self) -> crate::compute::plan::Owner<'_> {
        crate::compute::plan::Owner {
            instance: &self.instance,
            adopt_admiral: self.adopt_from == Some(AdoptFrom::Admiral),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sync_namespace: "admiral-sync".into(),
            keys: Keys::default(),
            alias_suffixes: Vec::new(),
            hostname_suffix: "global".into(),
            expose_ports: ExposePorts::Primary,
            global_port: 80,
            gateway_port: 15443,
            gateway_selectors: vec![
                LabelTerm { key: "istio".into(), value: "eastwestgateway".into() },
                LabelTerm { key: "app".into(), value: "istio-ingressgateway".into() },
            ],
            vip_mode: VipMode::Allocate,
            vip_cidr: "240.0.0.0/16".parse().expect("valid default CIDR"),
            export_to: ExportTo::All,
            sidecar_mode: SidecarMode::Generate,
            warmup_seconds: 45,
            instance: crate::meta::DEFAULT_INSTANCE.into(),
            adopt_from: None,
            import_vips_from: None,
            tenancy: Tenancy::Open,
            dependency_namespaces: vec!["admiral".into()],
            san_form: SanForm::Workload,
            trust_domain: "cluster.local".into(),
            san_prefix: String::new(),
        }
    }
}
