// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/**
 * @title CreditToken
 * @notice The DeepMarket credit: an ERC-20 with EIP-2612 permit. Borrowers escrow credits
 * to buy compute, lenders earn them by proving work.
 * @dev The supply changes only through {mint}, gated by MINTER_ROLE (onboarding grants).
 * There is no burn, so `totalSupply` equals the sum of all {CreditsMinted} amounts, which
 * is what makes credit conservation testable.
 */
contract CreditToken is ERC20, ERC20Permit, AccessControl {
    /// @notice A mint of zero credits or to the zero address was requested.
    error CreditInvalidGrant(address to, uint256 amount);

    /// @notice `amount` new credits were granted to `to`; `reason` says why (e.g. "onboarding").
    event CreditsMinted(address indexed to, uint256 amount, string reason);

    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @param admin receives DEFAULT_ADMIN_ROLE and MINTER_ROLE.
    constructor(address admin) ERC20("DeepMarket Credit", "DMC") ERC20Permit("DeepMarket Credit") {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(MINTER_ROLE, admin);
    }

    /**
     * @notice Creates `amount` credits (base units, 18 decimals) for `to`.
     *
     * Requirements:
     * - the caller has MINTER_ROLE;
     * - `to` is not the zero address and `amount` is not zero.
     */
    function mint(address to, uint256 amount, string calldata reason) external onlyRole(MINTER_ROLE) {
        if (to == address(0) || amount == 0) revert CreditInvalidGrant(to, amount);
        _mint(to, amount);
        emit CreditsMinted(to, amount, reason);
    }
}
