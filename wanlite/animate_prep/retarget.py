"""Pose retargeting (official `--retarget_flag`): the driving skeleton re-proportioned to the character."""
from __future__ import annotations

import math

import numpy as np

from wanlite.animate_prep.common import LIMBS
from wanlite.animate_prep.pose import PoseMeta, Skeleton


RETARGET_THRESHOLD = 0.4
# bones whose two sides get the larger of their two length ratios: shoulders, upper arms, forearms, neck-hips,
# thighs, shins, feet (indices into LIMBS)
PAIRED_BONES = [(0, 1), (2, 4), (3, 5), (6, 9), (7, 10), (8, 11), (17, 18)]


def _limb_geometry(px: np.ndarray) -> tuple[list[float], list[float]]:
    lengths, angles = [], []
    for i, j in LIMBS:
        p, q = px[i - 1], px[j - 1]
        lengths.append(((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2) ** 0.5)
        angles.append(math.degrees(math.atan2(p[1] - q[1], p[0] - q[0])))
    return lengths, angles


def _regrow(px: np.ndarray, lengths, angles) -> np.ndarray:
    """The skeleton rebuilt outward from the neck: each bone keeps its direction and takes its new length."""
    out = px[:, :2].astype(np.float64).copy()
    for (i, j), length, angle in zip(LIMBS, lengths, angles):
        out[j - 1] = (out[i - 1][0] - length * math.cos(math.radians(angle)),
                      out[i - 1][1] - length * math.sin(math.radians(angle)))
    return out


def _nose_to(meta: PoseMeta, lower: tuple[int, int]) -> float:
    return meta.height * abs((meta.body[lower[0], 1] + meta.body[lower[1], 1]) / 2 - meta.body[0, 1])


def _framing(body: np.ndarray, threshold: float) -> int:
    """2: ankles and hips in frame, 1: hips, 0: neither (the official full / three-quarter / half body)."""
    def visible(idx):
        return all(body[k, 1] <= 1 and body[k, 2] >= threshold for k in idx)
    return 2 if visible((10, 13, 8, 11)) else 1 if visible((8, 11)) else 0


def retarget(first: PoseMeta, reference: PoseMeta, metas: list[PoseMeta],
             threshold: float = RETARGET_THRESHOLD) -> list[Skeleton]:
    """The driving poses re-proportioned to the character (official `get_retarget_pose` without FLUX edits):
    every bone scaled by (character's bone / performer's bone in the first frame, both sides alike), the
    figure scaled by the nose-to-ankle (else nose-to-hip) height ratio, anchored at the feet (or the neck)
    where the character stands, hands scaled and carried to the new wrists; drawn on the character's canvas."""
    for lower in ((10, 13), (8, 11)):  # the performer / character height ratio: nose to ankles, else to hips
        if all((m.body[[0, *lower], 2] > 0.5).all() for m in (first, reference)):
            scale = _nose_to(first, lower) / _nose_to(reference, lower)
            break
    else:
        scale = math.sqrt(first.height * first.width) / math.sqrt(reference.height * reference.width)
    dst_w, dst_h = int(reference.width * scale), int(reference.height * scale)
    framing = min(_framing(reference.body, threshold), _framing(first.body, threshold))

    src_len, _ = _limb_geometry(first.body[:, :2] * (first.width, first.height))
    dst_len, _ = _limb_geometry(reference.body[:, :2] * (dst_w, dst_h))
    ratios = [d / s if s > 0 else None for s, d in zip(src_len, dst_len)]
    shoulders = (ratios[0] + ratios[1]) / 2 if ratios[0] is not None and ratios[1] is not None else 1.0
    ratios = [shoulders if r is None else r for r in ratios]  # a zero-length bone: the shoulders' ratio
    for a, b in PAIRED_BONES:
        ratios[a] = ratios[b] = max(ratios[a], ratios[b])
    for a, b in ((13, 15), (14, 16)):  # nose-eye and eye-ear bones: the mean of both sides
        ratios[a] = ratios[b] = (ratios[a] + ratios[b]) / 2

    first_px = first.body[:, :2] * (first.width, first.height)
    lengths, angles = _limb_geometry(first_px)
    rescaled_first = _regrow(first_px, [x * r for x, r in zip(lengths, ratios)], angles)
    if framing == 2:
        feet = [(reference.body[10, 1] + reference.body[19, 1]) / 2, (reference.body[13, 1] + reference.body[18, 1]) / 2]
        anchor_x = (rescaled_first[8, 0] + rescaled_first[11, 0]) / 2
        delta = np.array([anchor_x - (reference.body[8, 0] + reference.body[11, 0]) * dst_w / 2,
                          max(rescaled_first[10, 1], rescaled_first[13, 1]) - max(feet) * dst_h])
    else:
        anchor_x = rescaled_first[1, 0]
        delta = rescaled_first[1] - reference.body[1, :2] * (dst_w, dst_h)

    hand_ratio = max(ratios[0], ratios[1]) / scale
    skeletons = []
    for n, meta in enumerate(metas):
        size = np.array([meta.width, meta.height], np.float64)
        px = meta.body[:, :2] * size
        lengths, angles = _limb_geometry(px)
        new_len = [x * r for x, r in zip(lengths, ratios)]
        new_len[18] = min(new_len[18], new_len[8] * 0.5)  # feet at most half the shin
        new_len[17] = min(new_len[17], new_len[11] * 0.5)
        body = _regrow(px, new_len, angles)
        shift = delta.copy()
        if n == 0 and framing != 1:  # the official re-anchors the first frame on its own hips (neck)
            shift[0] += ((body[8, 0] + body[11, 0]) / 2 if framing == 2 else body[1, 0]) - anchor_x
        body = (body - shift) / scale

        # the official pairs the right wrist (body 4) with the COCO right hand, then swaps the two hands when
        # that hand's root is nearer the other wrist
        near, far = (_scale_hand(h, size, hand_ratio, threshold) for h in (meta.right_hand, meta.left_hand))
        d4, d7 = body[4] - px[4], body[7] - px[7]  # where the wrists moved
        if near[0, 0] != -1:
            d4 += px[4] - near[0, :2] * size
        if far[0, 0] != -1:
            d7 += px[7] - far[0, :2] * size
        root = near[0, :2] * size
        if np.hypot(*(px[4] - root)) > np.hypot(*(px[7] - root)):
            hands = _place_hand(far, d4, size), _place_hand(near, d7, size)
        else:
            hands = _place_hand(near, d4, size), _place_hand(far, d7, size)
        ref_size = np.array([reference.width, reference.height], np.float64)
        body_px = body / ref_size * ref_size  # normalised and back, as the official stores it
        skeletons.append(Skeleton(np.concatenate([body_px, meta.body[:, 2:]], 1), *hands))
    return skeletons


def _scale_hand(hand: np.ndarray, size: np.ndarray, ratio: float, threshold: float) -> np.ndarray:
    """Scaled about its root in normalised coordinates; unconfident points become (-1, -1, 0)."""
    xy = hand[:, :2] * size / size  # the official's pixel round trip
    out = np.concatenate([xy * ratio - xy[0] * (ratio - 1), hand[:, 2:]], 1)
    out[hand[:, 2] < threshold] = (-1, -1, 0)
    return out


def _place_hand(hand: np.ndarray, delta: np.ndarray, size: np.ndarray) -> np.ndarray:
    out = np.zeros_like(hand)
    for k, (x, y, score) in enumerate(hand):
        if score != 0:
            out[k] = (int(x * size[0] + delta[0]), int(y * size[1] + delta[1]), score)
    return out
