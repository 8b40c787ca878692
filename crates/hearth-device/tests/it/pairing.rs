use hearth_proto::capability::DeviceKind;
use hearth_proto::link::PairOutcome;
use hearth_proto::pairing::{PairError, PendingPairing};

use crate::support::{expect_err, wrong_secret_attempt, Controller, Device, FakeCloud, Pki};

#[tokio::test]
async fn pairing_with_the_label_secret_makes_an_owner() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    let mut link = cloud.accept().await;
    assert_eq!(&link.device, dev.id(), "the cloud learns the id from the certificate");

    let (lookup, report) = link.greeting(&dev.public_key()).await;
    assert_eq!(lookup, Some(dev.secret().lookup()), "a fresh device announces setup mode");
    assert!(report.is_none(), "an unpaired device's report is readable by nobody");

    let owner = Controller::new();
    let e = expect_err(link.pair(1, &wrong_secret_attempt(&owner)).await);
    assert_eq!(e, PairError::WrongSecret { tries_left: 19 });

    owner.pair(&mut link, 2, dev.secret()).await;
    let snap = agent.snapshot().await.unwrap();
    assert_eq!(snap.controllers, vec![owner.id()]);
    assert!(!snap.setup_mode);

    // Setup mode is closed now: even the right secret is refused.
    let intruder = Controller::new();
    let again = PendingPairing::start(dev.secret(), &intruder.key);
    assert_eq!(expect_err(link.pair(3, &again).await), PairError::NotInSetupMode);
    assert_eq!(agent.snapshot().await.unwrap().controllers, vec![owner.id()]);
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn twenty_failures_close_setup_mode_until_a_physical_reset() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let mut agent = dev.spawn(cloud.addr);
    let mut link = cloud.accept().await;
    link.greeting(&dev.public_key()).await;
    let attacker = Controller::new();

    for i in 1..=5u32 {
        let e = expect_err(link.pair(u64::from(i), &wrong_secret_attempt(&attacker)).await);
        assert_eq!(e, PairError::WrongSecret { tries_left: 20 - i });
    }
    // A reboot does not refill the attempt budget.
    agent.shutdown().await.unwrap();
    agent = dev.spawn(cloud.addr);
    link = cloud.accept().await;
    link.greeting(&dev.public_key()).await;
    for i in 6..=20u32 {
        let e = expect_err(link.pair(u64::from(i), &wrong_secret_attempt(&attacker)).await);
        assert_eq!(e, PairError::WrongSecret { tries_left: 20 - i });
    }
    // The 20th failure closes setup mode, and the device says so.
    link.expect_setup(None).await;

    let owner = Controller::new();
    let right = PendingPairing::start(dev.secret(), &owner.key);
    assert_eq!(expect_err(link.pair(21, &right).await), PairError::NotInSetupMode);
    assert!(agent.snapshot().await.unwrap().controllers.is_empty());

    agent.press_reset().await.unwrap();
    link.expect_setup(Some(dev.secret().lookup())).await;
    let snap = agent.snapshot().await.unwrap();
    assert!(snap.setup_mode);
    assert_eq!(snap.failed_attempts, 0);
    assert!(matches!(link.pair(22, &right).await, PairOutcome::Ok(_)));
    link.expect_setup(None).await;
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn reset_forgets_the_owner_and_reopens_pairing() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    let key = dev.public_key();
    let mut link = cloud.accept().await;
    link.greeting(&key).await;
    let mut old = Controller::new();
    old.pair(&mut link, 1, dev.secret()).await;
    assert_eq!(link.command(old.sign(dev.id(), hearth_proto::message::Command::Toggle), &key).await.outcome, hearth_proto::message::Outcome::Done);
    link.state(&key).await;

    agent.press_reset().await.unwrap();
    link.expect_setup(Some(dev.secret().lookup())).await;
    let r = link.command(old.sign(dev.id(), hearth_proto::message::Command::Toggle), &key).await;
    assert_eq!(
        r.outcome,
        hearth_proto::message::Outcome::Refused { reason: hearth_proto::acl::Refusal::NotPaired },
        "a reset controller is no longer trusted"
    );
    let new = Controller::new();
    new.pair(&mut link, 2, dev.secret()).await;
    assert_eq!(agent.snapshot().await.unwrap().controllers, vec![new.id()]);
    agent.shutdown().await.unwrap();
}
