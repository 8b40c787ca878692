//! What one benchmark run simulates: throwaway CAs, one key and certificate
//! per device, controllers with their keys and sessions, and the source
//! address of each link. Generated at run time into a temporary directory
//! (never committed) and shared with the worker processes as one file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context;
use futures_util::{StreamExt as _, TryStreamExt as _};
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use p256::ecdsa::SigningKey;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde::{Deserialize, Serialize};

/// Links per source address: below the cloud's per-address limit
/// (`hearth_cloud::MAX_CONNECTIONS_PER_ADDRESS`, 64), which exists to stop
/// one NAT address from taking every slot.
pub const LINKS_PER_ADDRESS: usize = 60;

/// One simulated device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Its id (the CN of its certificate).
    pub id: DeviceId,
    /// Its P-256 key, PKCS#8 PEM (bench-only, in the run's temp directory).
    pub key_pem: String,
    /// Its certificate from the bench manufacturer CA, PEM.
    pub cert_pem: String,
    /// The controller that owns it (index into [`Plan::controllers`]).
    pub controller: usize,
}

/// One simulated controller (one account, one key, one session).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerSpec {
    /// Its P-256 signing key, PKCS#8 PEM.
    pub key_pem: String,
    /// The session token seeded into the cloud's database.
    pub token: String,
    /// Its name, for people.
    pub name: String,
    /// The CN of its MQTT client certificate (Mosquitto's user name for it).
    pub mqtt_cn: String,
    /// Its MQTT client certificate (bench controller CA), PEM.
    pub mqtt_cert_pem: String,
    /// The key of that certificate, PEM.
    pub mqtt_key_pem: String,
}

/// Everything the orchestrator and the workers share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The cloud CA (devices and controllers trust only it).
    pub cloud_ca_pem: String,
    /// The name on the cloud's (and Mosquitto's) server certificate.
    pub server_name: String,
    /// The devices, in link order.
    pub devices: Vec<DeviceSpec>,
    /// The controllers.
    pub controllers: Vec<ControllerSpec>,
}

/// A run's generated material on disk.
pub struct Material {
    /// The plan.
    pub plan: Plan,
    /// The PKI directory for `hearth cloud serve --pki`.
    pub pki_dir: std::path::PathBuf,
    /// The bench controller CA (for Mosquitto's cafile), PEM.
    pub controller_ca_pem: String,
    /// The manufacturer CA, PEM.
    pub manufacturer_ca_pem: String,
}

impl Plan {
    /// Reads a plan written by [`Material::generate`].
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Device `i`'s source address: 127.0.0.2 onwards, [`LINKS_PER_ADDRESS`]
    /// links each (the whole 127/8 is loopback on Linux), so neither the
    /// cloud's per-address limit nor the ephemeral-port range is reached.
    pub fn source_address(i: usize) -> SocketAddr {
        let n = u32::from(Ipv4Addr::new(127, 0, 0, 2)) + (i / LINKS_PER_ADDRESS) as u32;
        SocketAddr::from((Ipv4Addr::from(n), 0))
    }
}

/// Parses a PKCS#8 PEM P-256 key.
pub fn signing_key(pem: &str) -> anyhow::Result<SigningKey> {
    SigningKey::from_pkcs8_pem(pem).context("parsing a bench key")
}

impl ControllerSpec {
    /// The controller's signing key.
    pub fn key(&self) -> anyhow::Result<SigningKey> {
        signing_key(&self.key_pem)
    }
}

impl DeviceSpec {
    /// The device's public key (as the cloud reads it from the certificate).
    pub fn public_key(&self) -> anyhow::Result<PublicKey> {
        Ok(PublicKey::from(&signing_key(&self.key_pem)?))
    }
}

impl Material {
    /// Creates the CAs under `dir`, then `devices` device identities (key,
    /// CSR, certificate: the provisioning path of `hearth device provision`)
    /// and `controllers` controller identities.
    pub fn generate(dir: &Path, devices: usize, controllers: usize) -> anyhow::Result<Self> {
        let server_name = "127.0.0.1".to_owned();
        let pki_dir = dir.join("pki");
        let pki = hearth_pki::PkiDir::init(&pki_dir, std::slice::from_ref(&server_name)).context("creating the bench PKI")?;
        let manufacturer = pki.manufacturer()?;
        let cloud_ca_pem = pki.read(hearth_pki::CLOUD_CA)?;
        let validity = hearth_pki::Validity::days(2);
        let controller_ca = hearth_pki::generate_ca("hearth-bench controller CA", validity)?;

        let mut rng = rand::rngs::OsRng;
        let mut ctl = Vec::with_capacity(controllers);
        for i in 0..controllers {
            let key = SigningKey::random(&mut rng);
            let name = format!("ctl-{i}");
            let (mqtt_cn, mqtt_cert_pem, mqtt_key_pem) = client_cert(&controller_ca, validity)?;
            ctl.push(ControllerSpec {
                key_pem: key.to_pkcs8_pem(Default::default()).context("encoding a key")?.to_string(),
                token: hearth_proto::b64::encode(rand::random::<[u8; 32]>()),
                name,
                mqtt_cn,
                mqtt_cert_pem,
                mqtt_key_pem,
            });
        }
        let mut devs = Vec::with_capacity(devices);
        for i in 0..devices {
            let key = SigningKey::random(&mut rng);
            let id = DeviceId::random();
            let csr = hearth_pki::device_csr(&key, &id)?;
            let cert_pem = hearth_pki::sign_device_csr(&manufacturer, &csr, &id, validity)?;
            devs.push(DeviceSpec {
                id,
                key_pem: key.to_pkcs8_pem(Default::default()).context("encoding a key")?.to_string(),
                cert_pem,
                controller: i % controllers.max(1),
            });
        }
        Ok(Self {
            plan: Plan { cloud_ca_pem, server_name, devices: devs, controllers: ctl },
            pki_dir,
            controller_ca_pem: controller_ca.cert_pem,
            manufacturer_ca_pem: manufacturer.cert_pem,
        })
    }

    /// Writes the plan for the workers.
    pub fn write_plan(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(&self.plan)?;
        hearth_pki::write_file(path, &bytes, true)?;
        Ok(())
    }

    /// Devices seeded at once.
    const SEED_CONCURRENCY: usize = 16;

    /// Pre-seeds the cloud's database with what pairing and login would
    /// have stored: one account per controller with its key and a session,
    /// and every device registered and owned by its controller's account.
    /// Pairing 10,000 devices through the pairing protocol would measure
    /// pairing, not the links.
    pub async fn seed(&self, database: &hearth_cloud::DatabaseUrl) -> anyhow::Result<()> {
        use hearth_cloud::seed::{token_hash, Store};
        let store = Store::connect(database).await.context("opening the cloud database to seed it")?;
        let now = unix_now();
        let mut accounts = Vec::new();
        for (i, c) in self.plan.controllers.iter().enumerate() {
            let account = store
                .create_account(format!("bench-{i}@hearth.invalid"), "not-a-password-hash".into())
                .await?
                .context("seed account exists already")?;
            let public = PublicKey::from(&c.key()?);
            store.upsert_controller(account.clone(), public.controller_id().to_string(), public.to_sec1(), c.name.clone()).await?;
            store.create_session(token_hash(&c.token), account.clone(), now + 24 * 3600).await?;
            accounts.push(account);
        }
        // Several devices at a time: one by one, 90,000 devices took eight
        // minutes on PostgreSQL (a commit round trip each); the store's pool
        // bounds what really runs at once.
        let (store, accounts) = (&store, &accounts);
        futures_util::stream::iter(self.plan.devices.iter().enumerate())
            .map(|(i, d)| async move {
                let der = hearth_pki::certs_from_pem(&d.cert_pem)?.remove(0).to_vec();
                store.device_connected(d.id.clone(), hearth_proto::capability::DeviceKind::Plug, der, now).await?;
                store.pair_device(d.id.clone(), accounts[d.controller].clone(), format!("plug-{i}"), now).await?;
                anyhow::Ok(())
            })
            .buffer_unordered(Self::SEED_CONCURRENCY)
            .try_collect::<()>()
            .await
    }
}

/// A client-auth certificate for a controller's MQTT connection, made on
/// the device path (own key, CSR, signed by `ca`). Its CN, the user name
/// Mosquitto takes from it, is a random id in the device-id format.
fn client_cert(ca: &hearth_pki::CertifiedKey, validity: hearth_pki::Validity) -> anyhow::Result<(String, String, String)> {
    let key = SigningKey::random(&mut rand::rngs::OsRng);
    let cn = DeviceId::random();
    let csr = hearth_pki::device_csr(&key, &cn)?;
    let cert = hearth_pki::sign_device_csr(ca, &csr, &cn, validity)?;
    Ok((cn.to_string(), cert, key.to_pkcs8_pem(Default::default()).context("encoding a key")?.to_string()))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
