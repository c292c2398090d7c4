"""CreditToken: minting, roles and EIP-2612 permits."""

from contract_support import (
    CREDIT,
    DEFAULT_ADMIN_ROLE,
    MINTER_ROLE,
    PERMIT_TYPE,
    TOKEN_DOMAIN_NAME,
    ZERO_ADDRESS,
    assert_event,
    eip712_domain,
    latest_timestamp,
    mined_at,
    recover_signer,
    reverts_with,
    sign_typed_data,
)


def sign_permit(token, owner, spender, value, deadline, nonce=None, signer=None):
    """Sign an EIP-2612 permit with `signer`'s key (the owner's by default); returns (v, r, s, digest)."""
    message = {
        "owner": owner.address,
        "spender": str(spender),
        "value": value,
        "nonce": token.nonces(owner) if nonce is None else nonce,
        "deadline": deadline,
    }
    domain = eip712_domain(TOKEN_DOMAIN_NAME, token)
    signature, digest = sign_typed_data(
        (signer or owner).private_key, domain, "Permit", {"Permit": PERMIT_TYPE}, message
    )
    return signature[64], signature[:32], signature[32:64], digest


def test_token_metadata_and_admin_roles(token, admin):
    assert token.name() == "DeepMarket Credit"
    assert token.symbol() == "DMC"
    assert token.decimals() == 18
    assert token.totalSupply() == 0
    assert token.hasRole(DEFAULT_ADMIN_ROLE, admin)
    assert token.hasRole(MINTER_ROLE, admin)


def test_mint_credits_recipient_and_emits_events(token, admin, borrower):
    tx = token.mint(borrower, 5 * CREDIT, "onboarding", {"from": admin})

    assert token.balanceOf(borrower) == 5 * CREDIT
    assert token.totalSupply() == 5 * CREDIT
    assert_event(tx, "CreditsMinted", token, to=borrower, amount=5 * CREDIT, reason="onboarding")
    assert_event(tx, "Transfer", token, **{"from": ZERO_ADDRESS, "to": borrower, "value": 5 * CREDIT})


def test_total_supply_is_sum_of_mints(token, admin, borrower, lender):
    amounts = [(borrower, 3 * CREDIT), (lender, 7), (borrower, 11 * CREDIT)]
    for account, amount in amounts:
        token.mint(account, amount, "grant", {"from": admin})

    assert token.totalSupply() == sum(amount for _, amount in amounts)
    assert token.balanceOf(borrower) + token.balanceOf(lender) == token.totalSupply()


def test_mint_rejects_zero_amount(token, admin, borrower):
    with reverts_with("CreditInvalidGrant", borrower, 0):
        token.mint(borrower, 0, "nothing", {"from": admin})


def test_mint_rejects_zero_address(token, admin):
    with reverts_with("CreditInvalidGrant", ZERO_ADDRESS, CREDIT):
        token.mint(ZERO_ADDRESS, CREDIT, "nowhere", {"from": admin})


def test_mint_rejects_caller_without_minter_role(token, stranger):
    with reverts_with("AccessControlUnauthorizedAccount", stranger, MINTER_ROLE):
        token.mint(stranger, CREDIT, "self-grant", {"from": stranger})

    assert token.totalSupply() == 0


def test_granted_minter_can_mint(token, admin, stranger, borrower):
    tx = token.grantRole(MINTER_ROLE, stranger, {"from": admin})
    assert_event(tx, "RoleGranted", token, role=MINTER_ROLE, account=stranger, sender=admin)

    token.mint(borrower, CREDIT, "grant", {"from": stranger})

    assert token.balanceOf(borrower) == CREDIT


def test_permit_sets_allowance(token, borrower, stranger, relayer):
    deadline = latest_timestamp() + 600
    v, r, s, digest = sign_permit(token, borrower, stranger, 5 * CREDIT, deadline)

    tx = token.permit(borrower, stranger, 5 * CREDIT, deadline, v, r, s, {"from": relayer})

    assert token.allowance(borrower, stranger) == 5 * CREDIT
    assert token.nonces(borrower) == 1
    assert_event(tx, "Approval", token, owner=borrower, spender=stranger, value=5 * CREDIT)


def test_permit_rejects_expired_deadline(token, borrower, stranger, relayer):
    deadline = latest_timestamp() + 100
    v, r, s, _ = sign_permit(token, borrower, stranger, CREDIT, deadline)

    with mined_at(deadline + 1), reverts_with("ERC2612ExpiredSignature", deadline):
        token.permit(borrower, stranger, CREDIT, deadline, v, r, s, {"from": relayer})


def test_permit_rejects_signature_of_another_key(token, borrower, lender, stranger, relayer):
    deadline = latest_timestamp() + 600
    v, r, s, _ = sign_permit(token, borrower, stranger, CREDIT, deadline, signer=lender)

    with reverts_with("ERC2612InvalidSigner", lender, borrower):
        token.permit(borrower, stranger, CREDIT, deadline, v, r, s, {"from": relayer})


def test_permit_rejects_replay(token, borrower, stranger, relayer):
    deadline = latest_timestamp() + 600
    v, r, s, _ = sign_permit(token, borrower, stranger, CREDIT, deadline)
    token.permit(borrower, stranger, CREDIT, deadline, v, r, s, {"from": relayer})
    # The token now hashes the permit with nonce 1, so the old signature recovers another address.
    *_, digest_with_next_nonce = sign_permit(token, borrower, stranger, CREDIT, deadline, nonce=1)
    recovered = recover_signer(digest_with_next_nonce, bytes(r) + bytes(s) + bytes([v]))

    with reverts_with("ERC2612InvalidSigner", recovered, borrower):
        token.permit(borrower, stranger, CREDIT, deadline, v, r, s, {"from": relayer})


def test_transfer_rejects_amount_above_balance(token, admin, borrower, stranger):
    token.mint(borrower, 10 * CREDIT - 1, "grant", {"from": admin})

    with reverts_with("ERC20InsufficientBalance", borrower, 10 * CREDIT - 1, 10 * CREDIT):
        token.transfer(stranger, 10 * CREDIT, {"from": borrower})


def test_transfer_rejects_zero_address(token, admin, borrower):
    token.mint(borrower, CREDIT, "grant", {"from": admin})

    with reverts_with("ERC20InvalidReceiver", ZERO_ADDRESS):
        token.transfer(ZERO_ADDRESS, CREDIT, {"from": borrower})


def test_approve_rejects_zero_spender(token, borrower):
    with reverts_with("ERC20InvalidSpender", ZERO_ADDRESS):
        token.approve(ZERO_ADDRESS, CREDIT, {"from": borrower})


def test_revoked_minter_cannot_mint(token, admin, stranger, borrower):
    token.grantRole(MINTER_ROLE, stranger, {"from": admin})

    tx = token.revokeRole(MINTER_ROLE, stranger, {"from": admin})

    assert_event(tx, "RoleRevoked", token, role=MINTER_ROLE, account=stranger, sender=admin)
    with reverts_with("AccessControlUnauthorizedAccount", stranger, MINTER_ROLE):
        token.mint(borrower, CREDIT, "grant", {"from": stranger})


def test_renounce_role_rejects_other_account(token, admin, stranger):
    with reverts_with("AccessControlBadConfirmation"):
        token.renounceRole(MINTER_ROLE, admin, {"from": stranger})

    assert token.hasRole(MINTER_ROLE, admin)
