// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {JobMarket} from "../JobMarket.sol";

/**
 * @title ReentrantToken (test only)
 * @notice An ERC-20 that calls back into its recipient on every transfer, as ERC-777 style
 * hooks do. Tests deploy a market over it to check that {JobMarket-withdraw} cannot be
 * re-entered. Never deployed outside tests.
 */
contract ReentrantToken is ERC20 {
    mapping(address => bool) public hooked;

    constructor() ERC20("Reentrant", "RNT") {}

    /// @notice Makes every transfer to `account` call `account.onTokensReceived`.
    function setHook(address account) external {
        hooked[account] = true;
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (hooked[to]) {
            WithdrawAttacker(to).onTokensReceived(value);
        }
    }
}

/**
 * @title WithdrawAttacker (test only)
 * @notice A borrower contract that gets a refund credited, then re-enters {JobMarket-withdraw}
 * from the token callback to try to collect it twice.
 */
contract WithdrawAttacker {
    JobMarket public immutable market;
    uint256 public reentries;
    bool private _attacking;

    constructor(JobMarket market_) {
        market = market_;
    }

    function submitAndCancel(JobMarket.JobRequest calldata request) external {
        ERC20(address(market.token())).approve(address(market), request.budget);
        uint256 jobId = market.submitJob(request);
        market.cancelJob(jobId);
    }

    function attack() external {
        _attacking = true;
        market.withdraw();
        _attacking = false;
    }

    function onTokensReceived(uint256) external {
        if (_attacking && reentries == 0) {
            reentries += 1;
            market.withdraw();
        }
    }
}
