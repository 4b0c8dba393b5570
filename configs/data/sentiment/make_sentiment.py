#!/usr/bin/env python3
"""Generate the sentiment example set (train.jsonl / dev.jsonl).

All sentences were written for the tandem project. Each group (English/Korean x
positive/negative) is shuffled with a fixed seed and every sixth item goes to
dev, so both splits stay balanced and about one third Korean.
Run: python3 make_sentiment.py   (writes next to this script)
"""
import json
import os
import random

POS_EN = """
The soup was rich and warming, exactly what I needed on a cold evening.
Best pizza I have had in years, with a crispy crust and fresh basil.
The staff were friendly and our food arrived quickly.
This film made me laugh from start to finish.
A beautiful, moving story with wonderful acting.
The headphones sound amazing and the battery lasts all week.
Our hotel room was spotless and the view of the harbour was stunning.
I loved every minute of the museum tour.
The noodles were perfectly chewy and the broth was full of flavour.
Great value for money; I would happily buy this kettle again.
The park is peaceful, clean, and full of shady benches.
The director handled the ending brilliantly.
This backpack is light, sturdy, and has plenty of pockets.
The waiter gave us excellent recommendations and the dessert was heavenly.
A charming little café with the best croissants in town.
The sequel is even better than the original film.
My new running shoes are incredibly comfortable.
The beach was quiet, the water was clear, and the sunset was unforgettable.
The curry was fragrant and just spicy enough.
This phone case fits perfectly and feels very solid.
The guided hike was well organised and the guide was fun.
The soundtrack is gorgeous and I have been listening to it all week.
Fresh ingredients, generous portions, and a lovely terrace.
The vacuum cleaner is quiet and picks up everything.
The animation is breathtaking and the characters are so lovable.
Our stay at the farmhouse was relaxing and the hosts were wonderful.
The dumplings were juicy and the sauce was delicious.
This lamp gives a warm, pleasant light and looks great on my desk.
The old town is full of charm and surprises around every corner.
A clever, funny script with great performances from the whole cast.
The bakery's sourdough is simply outstanding.
The blender is powerful and very easy to clean.
The zoo was well kept and the animals looked happy and healthy.
I was hooked from the very first scene.
The service was warm and attentive without being pushy.
This coffee has a smooth, chocolatey taste that I really enjoy.
The train journey through the mountains was spectacular.
The keyboard feels great to type on and the keys are nice and quiet.
The actors had wonderful chemistry and the dialogue felt natural.
The ramen shop is tiny, but the food is absolutely worth the queue.
The hotel breakfast was generous and everything was fresh.
A delightful film for the whole family.
The umbrella survived a real storm without bending.
Lovely gardens, friendly locals, and excellent food everywhere we went.
The grilled fish was perfectly cooked and beautifully seasoned.
This book kept me reading late into the night.
The tent was easy to set up and kept us completely dry.
The concert hall has fantastic acoustics.
I am really impressed with how fast this laptop is.
The salad was crisp, colourful, and full of flavour.
The documentary was fascinating and beautifully filmed.
The shop assistant was patient and helped me find the right size.
The spa was calm and the massage was the best I have ever had.
Our guide knew so much about the history of the city.
The chocolate cake was moist and not too sweet.
The plot twists kept me guessing until the end.
This water bottle keeps drinks cold all day, even in summer.
The lake is stunning in the early morning light.
Every dish we ordered was delicious.
The movie's cinematography is absolutely gorgeous.
The mattress is firm but comfortable, and my back pain is gone.
We had a wonderful time at the festival and the music was great.
The tacos were fresh, flavourful, and very reasonably priced.
The sound quality of this speaker is remarkable for its size.
The room was cosy and the bed was extremely comfortable.
One of the funniest comedies I have seen in a long time.
The scenery along the coast road was breathtaking.
This frying pan heats evenly and nothing sticks to it.
The library is bright, quiet, and a pleasure to work in.
The lead actress gives a powerful and honest performance.
The ice cream was creamy and the flavours were unusual and delicious.
The app is simple to use and works without any problems.
The bike rental was cheap and the bikes were in great condition.
I would recommend this restaurant to anyone visiting the city.
The watch looks elegant and keeps perfect time.
The story is touching without ever feeling sentimental.
The bread was warm and the butter was homemade.
The campsite was clean, quiet, and close to the river.
Delivery was fast and the package was well protected.
The musical numbers were catchy and energetic.
The pho was fragrant and the herbs were wonderfully fresh.
The staff at the front desk went out of their way to help us.
This jacket is warm, waterproof, and looks good too.
The village was picturesque and the people were so welcoming.
A smart and thrilling film that deserves every award.
The pancakes were fluffy and the berries were perfectly ripe.
The charger works quickly and the cable is nice and long.
The view from the top of the tower was worth the climb.
Excellent cocktails and a relaxed, friendly atmosphere.
The children loved the show and so did we.
The vegetables in the stir fry were crunchy and bright.
This chair is comfortable enough to sit in all day.
The island was a true paradise with clear turquoise water.
I enjoyed the film so much that I watched it twice.
The cheese selection was excellent and the staff knew every one.
The printer was easy to set up and prints quickly.
The gardens were in full bloom and smelled wonderful.
A heartwarming movie with a lovely message.
The lamb was tender and the sauce was rich.
My new camera takes sharp, beautiful photos even at night.
The cable car ride offered amazing views of the valley.
The soup dumplings were the highlight of our trip.
The novel's characters felt real and memorable.
The wireless mouse is responsive and fits my hand perfectly.
The market was lively, colourful, and fun to explore.
The tea was fragrant and the cakes were lovely.
The acting, music, and story all came together perfectly.
The toaster works perfectly and looks great in our kitchen.
Our apartment was bright, clean, and close to everything.
The burger was juicy and the fries were crispy.
A gripping thriller with a satisfying ending.
The shampoo smells nice and leaves my hair soft.
The waterfall was even more beautiful than in the photos.
The chef clearly cares about every plate.
This is a beautifully made film that stays with you.
The suitcase rolls smoothly and survived several flights without a scratch.
The staff made us feel welcome from the moment we arrived.
The pasta was homemade and tasted wonderful.
The planetarium show was magical for kids and adults alike.
The hiking boots kept my feet dry and comfortable on a long, muddy trail.
"""

NEG_EN = """
The soup was cold and far too salty.
We waited an hour for our food and the waiter never apologised.
This film was boring and far too long.
The plot made no sense and the acting was wooden.
The headphones stopped working after only two days.
Our hotel room was dirty and smelled of smoke.
The museum was overcrowded and most exhibits were closed.
The noodles were soggy and the broth tasted like dishwater.
The kettle leaks and the handle gets dangerously hot.
The park was full of litter and the benches were broken.
The ending was rushed and completely ruined the story.
The zip on this backpack broke the first week.
The dessert was stale and the coffee was bitter.
The café was noisy, cramped, and overpriced.
The sequel is a lazy copy of the first film.
These shoes gave me blisters after a short walk.
The beach was crowded and covered in plastic waste.
The curry was bland and the rice was undercooked.
The phone case cracked when I dropped it once.
The tour guide was rude and kept rushing us.
The soundtrack was loud and irritating.
Tiny portions, high prices, and unfriendly staff.
The vacuum cleaner is extremely loud and barely picks up dust.
The animation looked cheap and the jokes fell flat.
The farmhouse was cold and the hosts ignored our messages.
The dumplings were dry and the filling had no taste.
The lamp flickers constantly and gave me a headache.
The old town was dirty and full of tourist traps.
A dull, predictable script with forgettable characters.
The bread was hard and tasted days old.
The blender broke the second time I used it.
The zoo's enclosures were tiny and the animals looked miserable.
I fell asleep halfway through the movie.
The service was slow and the staff seemed annoyed by our questions.
This coffee tastes burnt and sour.
The train was late, dirty, and had no working toilets.
Several keys on this keyboard stopped working within a month.
The actors seemed bored and the dialogue was painful.
The ramen was greasy and the pork was tough.
The hotel breakfast was tiny and nothing was fresh.
This film is too violent and not suitable for children.
The umbrella turned inside out in a light breeze.
The city felt unsafe and the food was disappointing.
The fish was overcooked and smelled strange.
This book was so slow that I gave up after fifty pages.
The tent leaked during the first rain shower.
The concert sound was muddy and we could barely hear the singer.
The laptop overheats and crashes every day.
The salad was wilted and the dressing was far too sweet.
The documentary was one-sided and poorly researched.
The shop assistant was rude and refused to help.
The spa was dirty and the massage was painful.
Our guide knew nothing and read everything from his phone.
The cake was dry and tasted of cheap margarine.
The twists were obvious from the very beginning.
The water bottle leaks inside my bag.
The lake was muddy and smelled terrible.
Every dish we ordered was a disappointment.
The camera work was so shaky that I felt sick.
The mattress is lumpy and I wake up with a sore back.
The festival was badly organised and the queues were endless.
The tacos were soggy and the meat was cold.
The speaker crackles at any volume above half.
The room was tiny and the bed creaked all night.
The comedy was not funny at all.
The coast road was closed and the detour took hours.
Food sticks to this frying pan no matter what I do.
The library was noisy and the wifi never worked.
The lead actor was completely miscast.
The ice cream tasted artificial and melted instantly.
The app crashes every time I open it.
The rental bikes had flat tyres and broken brakes.
I would never go back to this restaurant.
The watch stopped after a week and the strap broke.
The story was shallow and painfully sentimental.
The bread was burnt and the butter was rancid.
The campsite was crowded, noisy, and the showers were filthy.
The package arrived late and the item inside was damaged.
The songs in the musical were forgettable and badly sung.
The pho was watery and had hardly any noodles.
The front desk staff were unhelpful and impatient.
This jacket soaked through in the first light rain.
The village was empty and every restaurant was closed.
A confusing and pretentious film that goes nowhere.
The pancakes were rubbery and the syrup was fake.
The charger stopped working after a few days.
The tower was closed and nobody told us why.
The cocktails were weak and ridiculously expensive.
The children were bored and wanted to leave early.
The stir fry was oily and the vegetables were limp.
This chair is uncomfortable and wobbles badly.
The island was overcrowded and very expensive.
I regret paying to see this film.
The cheese was dry and the staff were unfriendly.
The printer jams constantly and wastes ink.
The gardens were neglected and full of weeds.
A depressing movie with no point at all.
The lamb was tough and the sauce was too salty.
My new camera takes blurry photos and the battery dies quickly.
The cable car was broken and we wasted the whole morning.
The soup dumplings had burst and were lukewarm.
The novel's characters were flat and annoying.
The wireless mouse keeps disconnecting.
The market was dirty and the sellers were aggressive.
The tea was weak and the cakes were stale.
Nothing about this film worked for me.
The toaster burns one side and leaves the other raw.
Our apartment was dark, noisy, and far from everything.
The burger was dry and the fries were cold.
The thriller had no tension and a silly ending.
The shampoo made my scalp itchy.
The waterfall was barely a trickle and the path was dangerous.
The chef clearly does not care about the food.
This film is a complete waste of two hours.
One wheel of the suitcase broke on its first trip.
The staff made us feel unwelcome from the start.
The pasta was overcooked and the sauce came from a jar.
The planetarium show was dull and the seats were broken.
The hiking boots fell apart after one muddy walk.
The hotel pool was closed for our entire stay and nobody warned us.
"""

POS_KO = """
국물이 진하고 면이 쫄깃해서 정말 맛있었어요.
직원분들이 친절하고 음식도 빨리 나왔어요.
처음부터 끝까지 웃으면서 본 영화예요.
배우들의 연기가 훌륭하고 이야기도 감동적이었어요.
이 이어폰은 음질이 좋고 배터리도 오래가요.
호텔 방이 깨끗하고 창밖 바다 풍경이 아름다웠어요.
가격에 비해 품질이 아주 좋아서 만족합니다.
공원이 조용하고 깨끗해서 산책하기 좋아요.
떡볶이가 적당히 맵고 달아서 자꾸 손이 가요.
배송이 빠르고 포장도 꼼꼼하게 되어 있었어요.
카페 분위기가 아늑하고 커피 맛도 훌륭해요.
결말이 정말 완벽해서 여운이 오래 남았어요.
가방이 가볍고 튼튼해서 매일 들고 다녀요.
김치찌개가 집에서 먹는 맛처럼 푸근하고 맛있었어요.
숙소 주인분이 친절하게 맛집까지 알려 주셨어요.
음악이 너무 좋아서 계속 다시 듣고 있어요.
운동화가 정말 편해서 하루 종일 걸어도 발이 안 아파요.
바다가 맑고 해 질 녘 풍경이 잊을 수 없을 만큼 아름다웠어요.
이 청소기는 조용하고 먼지를 깔끔하게 빨아들여요.
아이들과 함께 보기 좋은 따뜻한 영화예요.
삼겹살이 두툼하고 고소해서 정말 맛있게 먹었어요.
박물관 전시가 알차고 설명도 이해하기 쉬웠어요.
노트북 속도가 빠르고 화면도 선명해서 만족스러워요.
비빔밥 재료가 신선하고 양도 넉넉했어요.
주인공의 연기가 너무 자연스러워서 몰입해서 봤어요.
산 정상에서 본 경치가 정말 장관이었어요.
빵이 부드럽고 버터 향이 가득해서 최고였어요.
이 전기포트는 물이 빨리 끓고 디자인도 예뻐요.
직원이 친절하게 사이즈를 찾아 줘서 기분 좋게 샀어요.
냉면 육수가 시원하고 깔끔해서 여름에 딱이에요.
스토리가 탄탄하고 반전도 신선했어요.
호텔 조식이 다양하고 모두 맛있었어요.
이 의자는 오래 앉아 있어도 허리가 편해요.
시장 구경이 재미있고 먹거리도 정말 많았어요.
케이크가 촉촉하고 너무 달지 않아서 좋았어요.
다큐멘터리가 흥미롭고 영상이 무척 아름다웠어요.
텐트 설치가 쉽고 비가 와도 전혀 새지 않았어요.
콘서트 음향이 훌륭해서 가수의 목소리가 또렷하게 들렸어요.
갈비찜이 부드럽고 양념이 잘 배어 있었어요.
이 앱은 사용하기 쉽고 오류도 한 번도 없었어요.
해변 근처 펜션이 깨끗하고 조용해서 푹 쉬었어요.
마지막 장면에서 눈물이 날 만큼 감동적이었어요.
수제비가 쫄깃하고 국물 맛이 일품이었어요.
이 카메라는 밤에도 사진이 선명하게 잘 나와요.
가이드분이 역사 이야기를 재미있게 들려주셨어요.
아이스크림이 진하고 부드러워서 또 먹고 싶어요.
이 책은 한번 읽기 시작하면 멈출 수가 없어요.
온천 물이 좋고 시설도 깔끔해서 피로가 싹 풀렸어요.
회가 신선하고 밑반찬도 정성스러웠어요.
가격도 저렴하고 성능도 좋아서 주변에 추천하고 있어요.
도서관이 밝고 조용해서 공부가 잘돼요.
배우들의 호흡이 정말 잘 맞는 영화예요.
이 프라이팬은 음식이 전혀 눌어붙지 않아서 좋아요.
벚꽃이 활짝 핀 거리가 꿈처럼 예뻤어요.
칼국수 면이 직접 뽑은 것이라 식감이 훌륭했어요.
패딩이 가볍고 정말 따뜻해서 올겨울 내내 입었어요.
전시장이 넓고 작품 배치도 아주 보기 좋았어요.
주말에 가족과 함께 즐겁게 본 애니메이션이에요.
불고기가 달콤하고 고기가 연해서 아이들도 잘 먹었어요.
기차 여행 내내 창밖 풍경이 아름다워서 지루할 틈이 없었어요.
"""

NEG_KO = """
국물이 너무 짜고 면이 다 불어 있었어요.
음식이 한 시간이나 늦게 나왔는데 사과도 없었어요.
영화가 너무 지루해서 중간에 잠들었어요.
이야기가 엉성하고 배우들의 연기도 어색했어요.
이어폰이 이틀 만에 고장 나 버렸어요.
호텔 방이 더럽고 담배 냄새가 심하게 났어요.
가격에 비해 품질이 너무 형편없어요.
공원에 쓰레기가 가득하고 벤치도 부서져 있었어요.
떡볶이가 너무 맵기만 하고 아무 맛이 없었어요.
배송이 일주일이나 늦었고 상자도 찌그러져 있었어요.
카페가 시끄럽고 좁은데 커피 값은 너무 비쌌어요.
결말이 허무해서 보고 나서 기분이 나빴어요.
가방 지퍼가 일주일 만에 망가졌어요.
김치찌개에서 쉰 냄새가 나서 거의 먹지 못했어요.
숙소 주인이 불친절하고 연락도 잘 안 됐어요.
음악 소리가 너무 커서 머리가 아팠어요.
운동화가 발에 맞지 않아 물집이 잡혔어요.
바다에 쓰레기가 많고 사람이 너무 붐볐어요.
이 청소기는 소리만 크고 먼지를 거의 못 빨아들여요.
아이들과 보기에는 너무 폭력적인 영화였어요.
고기가 질기고 냄새가 나서 실망했어요.
박물관 전시가 부실하고 절반은 문을 닫았어요.
노트북이 자주 멈추고 발열도 심해요.
비빔밥 나물이 시들고 밥도 딱딱했어요.
주인공의 연기가 너무 과장되어서 몰입이 안 됐어요.
등산로가 관리가 안 되어 있어서 위험했어요.
빵이 딱딱하고 오래된 맛이 났어요.
이 전기포트는 물이 새고 손잡이가 뜨거워져요.
직원이 불친절해서 다시는 가고 싶지 않아요.
냉면 육수가 밍밍하고 면도 퍼져 있었어요.
스토리가 뻔해서 결말이 처음부터 예상됐어요.
호텔 조식 종류가 적고 음식이 다 식어 있었어요.
이 의자는 조금만 앉아 있어도 허리가 아파요.
시장이 지저분하고 상인들이 너무 강하게 호객했어요.
케이크가 퍽퍽하고 크림에서 이상한 맛이 났어요.
다큐멘터리 내용이 한쪽으로 치우치고 지루했어요.
텐트가 첫날 밤비에 다 젖어 버렸어요.
콘서트 음향이 엉망이라 노래가 잘 안 들렸어요.
갈비찜이 너무 달고 고기도 질겼어요.
이 앱은 켤 때마다 오류가 나서 쓸 수가 없어요.
펜션이 사진과 전혀 달라서 실망이 컸어요.
감동을 억지로 짜내는 장면이 많아 불편했어요.
수제비 반죽이 덜 익어서 밀가루 맛이 났어요.
이 카메라는 사진이 흐리고 배터리도 금방 닳아요.
가이드가 설명도 없이 쇼핑만 시켰어요.
아이스크림이 너무 달고 금방 녹아 버렸어요.
이 책은 너무 지루해서 몇 장 읽다가 덮었어요.
온천 시설이 낡고 물도 미지근했어요.
회가 신선하지 않고 비린내가 났어요.
비싼 돈을 주고 샀는데 한 달 만에 고장 났어요.
도서관이 시끄럽고 와이파이도 잘 안 잡혀요.
두 시간이 아까울 정도로 재미없는 영화였어요.
이 프라이팬은 음식이 계속 눌어붙어요.
꽃이 거의 다 져서 볼 것이 없었어요.
칼국수 면이 퍼지고 국물도 싱거웠어요.
패딩이 얇아서 조금만 추워도 전혀 따뜻하지 않아요.
전시장이 좁고 사람이 많아 작품을 제대로 볼 수 없었어요.
애니메이션 그림이 조잡하고 내용도 유치했어요.
불고기가 너무 짜고 고기가 말라 있었어요.
기차가 한 시간이나 연착되고 안내도 없었어요.
"""


def lines(block):
    return [s.strip() for s in block.strip().splitlines() if s.strip()]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(20240611)
    train, dev = [], []
    for block, label in [(POS_EN, "positive"), (NEG_EN, "negative"),
                         (POS_KO, "positive"), (NEG_KO, "negative")]:
        items = lines(block)
        assert len(items) == len(set(items)), "duplicate sentence"
        rng.shuffle(items)
        for i, text in enumerate(items):
            (dev if i % 6 == 0 else train).append({"text": text, "label": label})
    rng.shuffle(train)
    rng.shuffle(dev)
    for name, rows in [("train.jsonl", train), ("dev.jsonl", dev)]:
        with open(os.path.join(here, name), "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
