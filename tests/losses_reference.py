"""NumPy references of the losses, float64, written from the formulas of docs/design.md §4.

They never call the JAX code. REFERENCES maps a case name of tests/losses_cases.py to its
reference: `fn(arrays, static) -> float`.
"""

import numpy as np


def _np_logsumexp(x, axis=-1):
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def _np_log_softmax(x):
    return x - _np_logsumexp(x)[..., None]


def np_softmax_loss(zimg, ztxt, logit_scale):
    logits = logit_scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    diag = np.arange(len(logits))
    loss_rows = -np.mean(_np_log_softmax(logits)[diag, diag])
    loss_cols = -np.mean(_np_log_softmax(logits.T)[diag, diag])
    return (loss_rows + loss_cols) / 2


def np_softmax_hard_negative_loss(zimg, ztxt, zneg, neg_mask, logit_scale):
    """The softmax loss with image i's valid hard negatives appended to its image→text row."""
    zimg, ztxt, zneg = (x.astype(np.float64) for x in (zimg, ztxt, zneg))
    logits = logit_scale * zimg @ ztxt.T
    rows = []
    for i in range(len(zimg)):
        own = logit_scale * zneg[i][neg_mask[i]] @ zimg[i]
        row = np.concatenate([logits[i], own])
        rows.append(-_np_log_softmax(row[None])[0, i])
    diag = np.arange(len(logits))
    loss_cols = -np.mean(_np_log_softmax(logits.T)[diag, diag])
    return (np.mean(rows) + loss_cols) / 2


def np_sigmoid_loss(zimg, ztxt, logit_scale, logit_bias):
    n = len(zimg)
    logits = logit_scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + logit_bias
    labels = 2 * np.eye(n) - 1
    return np.sum(np.logaddexp(0.0, -labels * logits)) / n  # −log σ(x) = log(1 + e^{−x})


def np_medclip_loss(zimg, ztxt, img_labels, txt_labels, logit_scale, label_temperature):
    def with_no_finding(labels):
        extra = np.all(labels == 0, axis=1, keepdims=True).astype(np.float64)
        labels = np.concatenate([labels, extra], axis=1)
        return labels / np.linalg.norm(labels, axis=1, keepdims=True)

    s = with_no_finding(img_labels) @ with_no_finding(txt_labels).T  # [N_img, N_txt]
    logits = logit_scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    y_v2t = np.exp(_np_log_softmax(s / label_temperature))
    y_t2v = np.exp(_np_log_softmax(s.T / label_temperature))
    loss_v2t = -np.sum(y_v2t * _np_log_softmax(logits)) / len(zimg)
    loss_t2v = -np.sum(y_t2v * _np_log_softmax(logits.T)) / len(ztxt)
    return (loss_v2t + loss_t2v) / 2


def np_dhn_nce_literal(zimg, ztxt, temperature, beta1, beta2, reduction):
    """Eq. 1–5 term by term, with the weight matrix W built explicitly."""
    x, y = zimg.astype(np.float64), ztxt.astype(np.float64)
    batch = len(x)

    def direction(a, b, beta):
        total = 0.0
        for i in range(batch):
            others = [j for j in range(batch) if j != i]
            weights = {
                j: (batch - 1)
                * np.exp(beta * a[i] @ b[j] / temperature)
                / sum(np.exp(beta * a[i] @ b[k] / temperature) for k in others)
                for j in others
            }
            inner = sum(np.exp(a[i] @ b[j] / temperature) * weights[j] for j in others)
            total += -a[i] @ b[i] / temperature + np.log(inner)
        return total

    loss = direction(x, y, beta1) + direction(y, x, beta2)
    return loss / batch if reduction == "mean" else loss


def np_roi_loss(zroi, zcap, roi_mask, cap_ids, logit_scale):
    valid = roi_mask.reshape(-1)
    rois = zroi.reshape(-1, zroi.shape[-1])[valid].astype(np.float64)
    caps = zcap.reshape(-1, zcap.shape[-1])[valid].astype(np.float64)
    ids = None if cap_ids is None else cap_ids.reshape(-1)[valid]
    logits = logit_scale * rois @ caps.T

    def direction(logits):
        total = 0.0
        for i in range(len(logits)):
            positives = [
                j for j in range(len(logits)) if j == i or (ids is not None and ids[j] == ids[i])
            ]
            log_probs = _np_log_softmax(logits[i])
            total += -np.mean(log_probs[positives])
        return total / len(logits)

    return (direction(logits) + direction(logits.T)) / 2


def np_negative_caption_loss(zroi, zcap, zneg, roi_mask, neg_mask, logit_scale):
    total, count = 0.0, 0
    for b, r in zip(*np.nonzero(roi_mask), strict=True):
        positive = logit_scale * zroi[b, r].astype(np.float64) @ zcap[b, r]
        negatives = [
            logit_scale * zroi[b, r].astype(np.float64) @ zneg[b, r, k]
            for k in range(zneg.shape[2])
            if neg_mask[b, r, k]
        ]
        denominator = np.exp(positive) + sum(np.exp(v) for v in negatives)
        total += -np.log(np.exp(positive) / denominator)
        count += 1
    return total / count


def np_distillation_loss(student_logits, teacher_logits, roi_mask):
    log_s = _np_log_softmax(student_logits.astype(np.float64))[roi_mask]
    log_t = _np_log_softmax(teacher_logits.astype(np.float64))[roi_mask]
    return np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1))


def np_gloria_local_loss(zwords, word_mask, zpatch, temperature1, temperature2, temperature3):
    """GLoRIA's local loss pair by pair, word by word: attention, context, cosine, log-sum-exp."""
    words, patches = zwords.astype(np.float64), zpatch.astype(np.float64)
    batch = len(patches)
    scores = np.zeros((batch, batch))  # [image, report]
    for image in range(batch):
        for report in range(batch):
            relevances = []
            for w in words[report][word_mask[report]]:
                attention = np.exp(temperature1 * patches[image] @ w)
                attention /= attention.sum()
                context = attention @ patches[image]
                relevances.append(w @ context / (np.linalg.norm(w) * np.linalg.norm(context)))
            scores[image, report] = temperature3 * np.log(
                np.sum(np.exp(temperature2 * np.array(relevances)))
            )
    diag = np.arange(batch)
    loss_i2t = -np.mean(_np_log_softmax(scores)[diag, diag])
    loss_t2i = -np.mean(_np_log_softmax(scores.T)[diag, diag])
    return (loss_i2t + loss_t2i) / 2


def np_giou(a, b):
    """Generalised IoU of two xyxy boxes, from the definition."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def np_box_loss(boxes, objectness, targets, positive, l1, giou, objectness_weight):
    """The box loss cell by cell: L1 and 1 − GIoU over assigned cells, BCE over all."""
    boxes, targets = boxes.astype(np.float64), targets.astype(np.float64)
    cells = list(zip(*np.nonzero(positive), strict=True))
    distance = np.mean([np.abs(boxes[c] - targets[c]).sum() for c in cells])
    gen = np.mean([1.0 - np_giou(boxes[c], targets[c]) for c in cells])
    p = 1.0 / (1.0 + np.exp(-objectness.astype(np.float64)))
    bce = -np.mean(np.where(positive, np.log(p), np.log(1.0 - p)))
    return l1 * distance + giou * gen + objectness_weight * bce


# "sigmoid_gather" has no entry: dense, the two sigmoid impls are the same loss.
REFERENCES = {
    "softmax": lambda a, s: np_softmax_loss(a["zimg"], a["ztxt"], a["logit_scale"]),
    "softmax_hard_negatives": lambda a, s: np_softmax_hard_negative_loss(
        a["zimg"], a["ztxt"], a["zneg"], a["neg_mask"], a["logit_scale"]
    ),
    "sigmoid_ring": lambda a, s: np_sigmoid_loss(
        a["zimg"], a["ztxt"], a["logit_scale"], a["logit_bias"]
    ),
    "medclip": lambda a, s: np_medclip_loss(
        a["zimg"],
        a["ztxt"],
        a["img_labels"],
        a["txt_labels"],
        a["logit_scale"],
        s["label_temperature"],
    ),
    # The masked loss is the loss of the images and texts that are there.
    "medclip_unpaired": lambda a, s: np_medclip_loss(
        a["zimg"][a["img_mask"]],
        a["ztxt"][a["txt_mask"]],
        a["img_labels"][a["img_mask"]],
        a["txt_labels"][a["txt_mask"]],
        a["logit_scale"],
        s["label_temperature"],
    ),
    "dhn_nce_mean": lambda a, s: np_dhn_nce_literal(a["zimg"], a["ztxt"], a["temperature"], **s),
    "dhn_nce_sum": lambda a, s: np_dhn_nce_literal(a["zimg"], a["ztxt"], a["temperature"], **s),
    "roi": lambda a, s: np_roi_loss(
        a["zroi"], a["zcap"], a["roi_mask"], a["cap_ids"], a["logit_scale"]
    ),
    "roi_without_ids": lambda a, s: np_roi_loss(
        a["zroi"], a["zcap"], a["roi_mask"], None, a["logit_scale"]
    ),
    "negative_caption": lambda a, s: np_negative_caption_loss(
        a["zroi"], a["zcap"], a["zneg"], a["roi_mask"], a["neg_mask"], a["logit_scale"]
    ),
    "distillation": lambda a, s: np_distillation_loss(
        a["student_logits"], a["teacher_logits"], a["roi_mask"]
    ),
    "gloria_local": lambda a, s: np_gloria_local_loss(
        a["zwords"], a["word_mask"], a["zpatch"], **s
    ),
    "box": lambda a, s: np_box_loss(**a, **s),
}
